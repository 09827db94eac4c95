"""Speed switches on one device: bf16/fp16 autocast, channels_last, and no host sync per step."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from deltatl.config import TrainConfig
from deltatl.data import ArrayImages, TransformedImages
from deltatl.attention import layer_channels
from deltatl.engine.fit import autocast_networks, fit
from deltatl.engine.objective import Objective
from deltatl.errors import DeltatlError
from deltatl.features import layer_preset
from deltatl.models import create_model

SEED = 7


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    return create_model("test_resnet", 3, pretrained="none")


def delta_objective(model: torch.nn.Module) -> Objective:
    layers = layer_preset(model, "test_resnet")
    channels = layer_channels(model, layers, 32)
    g = torch.Generator().manual_seed(0)
    weights = {name: torch.softmax(torch.randn(c, generator=g), 0) for name, c in channels.items()}
    return Objective(model, "delta", layers=layers, channel_weights=weights)


def batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0][:n])


def perturbed_delta_objective() -> Objective:
    """DELTA with the target moved away from the source, so that the DELTA term is not zero."""
    objective = delta_objective(tiny_model())
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in objective.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return objective


def test_bf16_autocast_runs_a_delta_step_and_the_delta_term_is_float32():
    objective = perturbed_delta_objective()
    optimizer = torch.optim.SGD(objective.param_groups(), lr=0.01)
    before = [p.detach().clone() for p in objective.model.parameters()]
    images, labels = batch()
    seen = {}

    def record(name):
        def hook(_module, _args, output):
            seen[name] = output.dtype
        return hook

    for name, module in (("target", objective.model), ("source", objective.source)):
        module.conv1[0].register_forward_hook(record(name))
    with autocast_networks(objective, "cpu", torch.bfloat16):
        out = objective(images, labels)
    assert seen == {"target": torch.bfloat16, "source": torch.bfloat16}  # both networks under autocast
    assert out["reg/delta"].dtype == torch.float32 and out["reg/delta"] > 0
    assert out["logits"].dtype == out["reg/head"].dtype == out["ce"].dtype == out["loss"].dtype == torch.float32
    out["loss"].backward()
    optimizer.step()
    after = list(objective.model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert all(p.dtype == torch.float32 for p in after)  # autocast never changes the weights' dtype


def test_bf16_delta_term_is_close_to_the_float32_one():
    objective = perturbed_delta_objective()
    images, labels = batch()
    objective.eval()  # no BatchNorm update between the two forwards
    full = objective(images, labels)
    with autocast_networks(objective, "cpu", torch.bfloat16):
        half = objective(images, labels)
    assert half["reg/delta"].item() == pytest.approx(full["reg/delta"].item(), rel=0.05)


def test_channels_last_gives_the_same_loss_and_gradients_as_contiguous():
    contiguous = perturbed_delta_objective()
    last = perturbed_delta_objective()  # the same (a deep copy would share the feature hooks)
    last.to(memory_format=torch.channels_last)
    assert last.model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    images, labels = batch()
    out_c = contiguous(images, labels)
    out_l = last(images.to(memory_format=torch.channels_last), labels)
    for key in ("loss", "ce", "reg/delta", "reg/head"):
        assert out_l[key].item() == pytest.approx(out_c[key].item(), rel=1e-5, abs=1e-6), key
    out_c["loss"].backward()
    out_l["loss"].backward()
    for (name, p_c), p_l in zip(contiguous.model.named_parameters(), last.model.parameters()):
        # other summation orders: agreement to float32 noise, relative to each gradient's scale
        assert torch.allclose(p_l.grad, p_c.grad, rtol=1e-3, atol=1e-5 * p_c.grad.abs().max().item()), name


def train(cli, data, out, *flags):
    return cli("train", "--data", data, "--model", "test_resnet", "--pretrained", "none", "--image-size", "32",
               "--batch-size", "4", "--iters", "2", "--device", "cpu", "--quiet", "--method", "l2-sp",
               *flags, "--out", out)


def weights(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]


def test_a_channels_last_run_ends_with_the_weights_of_a_contiguous_run(cli, image_folder, tmp_path):
    data = image_folder()
    assert train(cli, data, tmp_path / "a", "--no-channels-last").code == 0
    assert train(cli, data, tmp_path / "b").code == 0  # the default on the CPU: channels-last
    plain, last = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert list(plain) == list(last)
    for key in plain:
        assert torch.allclose(last[key], plain[key], rtol=0, atol=1e-5), key
    # an execution switch: not part of the run's identity
    assert "channels_last" not in yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_mixed_precision_run_keeps_float32_weights_and_records_its_precision(cli, image_folder, tmp_path, amp):
    result = train(cli, image_folder(), tmp_path / "run", "--amp", amp)
    assert result.code == 0, result.err
    state = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert all(t.dtype == torch.float32 for k, t in state["model"].items() if "num_batches" not in k)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert (state["scaler"] is not None) == (amp == "fp16")  # a gradient scaler for fp16 only
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["amp"] == amp


def test_an_unknown_precision_is_refused():
    with pytest.raises(DeltatlError, match="`amp`"):
        TrainConfig(amp="fp8")


def test_the_hot_loop_reads_no_tensor_on_the_host_between_logging_steps(tmp_path, monkeypatch):
    """Twice the steps in one epoch, the same number of ``.item()`` calls: none per step."""
    rng = np.random.default_rng(0)
    images = ArrayImages(rng.integers(0, 255, (24, 32, 32, 3), dtype=np.uint8), np.arange(24) % 3,
                         ["a", "b", "c"], "train")
    dataset = TransformedImages(images, lambda img: torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1),
                                seed=0)
    item = torch.Tensor.item
    counts = []
    for steps in (2, 4):
        calls = [0]

        def counting_item(self, _calls=calls):
            _calls[0] += 1
            return item(self)

        monkeypatch.setattr(torch.Tensor, "item", counting_item)
        objective = Objective(tiny_model(), "l2-sp")
        fit(objective, dataset, None, None, run_dir=str(tmp_path / f"run{steps}"), total_steps=steps, batch_size=4,
            lr=0.01, progress=False, log_every=1)
        monkeypatch.setattr(torch.Tensor, "item", item)
        counts.append(calls[0])
    assert counts[0] == counts[1]


def test_channels_last_is_on_by_default_on_cpu_and_cuda_off_on_mps_and_a_flag_wins():
    from deltatl.run import use_channels_last

    assert use_channels_last(None, torch.device("cpu")) and use_channels_last(None, torch.device("cuda"))
    assert not use_channels_last(None, torch.device("mps"))
    assert not use_channels_last(False, torch.device("cpu")) and use_channels_last(True, torch.device("mps"))
