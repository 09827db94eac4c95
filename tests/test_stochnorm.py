"""StochNorm: each channel normalised by the batch's or (with probability p) the moving statistics."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from deltatl.engine.stochnorm import StochasticStatistics, convert_stochnorm


def layers(p: float, kind=nn.BatchNorm2d) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    bn = kind(64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    stoch = copy.deepcopy(bn)
    assert convert_stochnorm(stoch, p) == 1
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
    assert stoch.training  # left in training mode


@pytest.mark.parametrize("kind", [nn.BatchNorm2d, BatchNormAct2d])  # timm's, with its activation inside
def test_each_channel_takes_one_branch_about_p_of_them_the_moving_one_and_eval_is_batchnorm(kind):
    x = torch.randn(8, 64, 5, 5, generator=torch.Generator().manual_seed(2))
    bn, stoch = layers(0.5, kind)
    moving = copy.deepcopy(bn).eval()(x)
    batch = copy.deepcopy(bn).train()(x)
    if kind is BatchNormAct2d:
        assert (batch >= 0).all() and (moving >= 0).all()  # the ReLU is applied in both branches
    torch.manual_seed(3)
    out = stoch.train()(x)
    took_moving = [torch.equal(out[:, c], moving[:, c]) for c in range(64)]
    took_batch = [torch.equal(out[:, c], batch[:, c]) for c in range(64)]
    assert all(m or b for m, b in zip(took_moving, took_batch))  # one branch per channel, whole
    assert 20 <= sum(m and not b for m, b in zip(took_moving, took_batch)) <= 44  # Bernoulli(0.5), 64 channels
    bn.train()(x)  # the same update of the running statistics
    assert torch.equal(stoch.eval()(x), bn.eval()(x))


def test_a_converted_network_keeps_its_modules_and_state_dict_trains_on_the_cpu_and_copies():
    model = timm.create_model("tf_efficientnet_lite0", num_classes=3)  # BatchNormAct2d with ReLU6
    reference = copy.deepcopy(model)
    count = convert_stochnorm(model, 0.5)
    assert count == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) == 49
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    x = torch.randn(4, 3, 64, 64)
    loss = model.train()(x).logsumexp(1).mean()
    loss.backward()
    assert torch.isfinite(loss) and model.classifier.weight.grad is not None
    copied = copy.deepcopy(model)  # DELTA's source is a deep copy: its hooks follow, and do nothing in eval
    reference.load_state_dict(model.state_dict())  # the statistics the training step updated
    assert torch.equal(copied.eval()(x), reference.eval()(x))
    with pytest.raises(Exception, match="in \\[0, 1\\]"):
        StochasticStatistics(1.5)


def test_the_gradients_are_those_of_the_formula_with_the_statistics_from_before_the_update():
    """Independent formula: per channel, (x - m) / sqrt(v + eps) * w + b with (m, v) the running statistics
    (moving channels) or the batch's (the others, differentiated through). The running statistics are
    updated in place by the same forward: the moving branch's backward must not see the new ones."""
    x = torch.randn(4, 64, 5, 5, generator=torch.Generator().manual_seed(4)) * 2 + 0.3
    g = torch.randn(4, 64, 5, 5, generator=torch.Generator().manual_seed(5))
    bn, stoch = layers(0.5)
    inputs = x.clone().requires_grad_(True)
    torch.manual_seed(3)
    (stoch.train()(inputs) * g).sum().backward()
    torch.manual_seed(3)
    pick = torch.rand(64) < 0.5  # the draw the layer made (one per channel, after its forward)
    assert 0 < pick.sum() < 64
    ref_x, weight, bias = x.clone().requires_grad_(True), bn.weight.detach().clone().requires_grad_(True), \
        bn.bias.detach().clone().requires_grad_(True)
    var, mean = torch.var_mean(ref_x, dim=(0, 2, 3), unbiased=False)
    m, v = torch.where(pick, bn.running_mean, mean), torch.where(pick, bn.running_var, var)
    out = (ref_x - m[:, None, None]) / (v[:, None, None] + bn.eps).sqrt() * weight[:, None, None] + bias[:, None, None]
    (out * g).sum().backward()
    for ours, ref in ((inputs.grad, ref_x.grad), (stoch.weight.grad, weight.grad), (stoch.bias.grad, bias.grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
