"""StochNorm: each channel normalised by the batch's or (with probability p) the moving statistics."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from deltatl.engine.stochnorm import StochNorm, convert_stochnorm


def layers(p: float) -> tuple[nn.BatchNorm2d, StochNorm]:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    stoch = StochNorm(64, p)
    stoch.load_state_dict(bn.state_dict())
    return bn, stoch


def test_with_p_0_it_is_batchnorm_in_training_and_with_p_1_the_moving_statistics():
    x = torch.randn(8, 64, 5, 5, generator=torch.Generator().manual_seed(1)) * 2 + 0.3
    bn, stoch = layers(0.0)
    assert torch.equal(stoch.train()(x), bn.train()(x))
    assert torch.equal(stoch.running_mean, bn.running_mean) and torch.equal(stoch.running_var, bn.running_var)
    bn, stoch = layers(1.0)
    expected = copy.deepcopy(bn).eval()(x)  # the statistics from before this batch
    assert torch.equal(stoch.train()(x), expected)
    bn.train()(x)
    assert torch.equal(stoch.running_var, bn.running_var)  # updated as BatchNorm updates them


def test_each_channel_takes_one_branch_about_p_of_them_the_moving_one_and_eval_is_batchnorm():
    x = torch.randn(8, 64, 5, 5, generator=torch.Generator().manual_seed(2))
    bn, stoch = layers(0.5)
    moving = copy.deepcopy(bn).eval()(x)
    batch = copy.deepcopy(bn).train()(x)
    torch.manual_seed(3)
    out = stoch.train()(x)
    took_moving = [torch.equal(out[:, c], moving[:, c]) for c in range(64)]
    took_batch = [torch.equal(out[:, c], batch[:, c]) for c in range(64)]
    assert all(m != b for m, b in zip(took_moving, took_batch))  # one branch per channel, whole
    assert 20 <= sum(took_moving) <= 44  # Bernoulli(0.5) over 64 channels
    bn.train()(x)  # the same update of the running statistics
    assert torch.equal(stoch.eval()(x), bn.eval()(x))


def test_a_converted_network_keeps_its_state_dict_and_trains_on_the_cpu():
    model = timm.create_model("test_resnet", num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count = convert_stochnorm(model, 0.5)
    assert count == sum(isinstance(m, nn.BatchNorm2d) for m in timm.create_model("test_resnet").modules()) > 0
    assert all(isinstance(m, StochNorm) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    loss = model.train()(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    assert torch.isfinite(loss) and model.fc.weight.grad is not None
    with pytest.raises(Exception, match="in \\[0, 1\\]"):
        StochNorm(4, 1.5)
