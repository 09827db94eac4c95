"""RIFLE's comparison tricks and Table 2's augmentation switches: each changes what it names, nothing else.

Dropout / DropConnect on the head, Stochastic Depth, DisturbLabel, the cyclic learning rates, the
aspect-keeping resize and 10-crop testing.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from deltatl.config import TrainConfig
from deltatl.data import ArrayImages, TransformedImages
from deltatl.data.transforms import eval_transform, evaluation_transform, ten_crop_transform, train_transform
from deltatl.distributed import DistEnv
from deltatl.engine.evaluate import crop_logits, evaluate
from deltatl.engine.schedule import CyclicLRScheduler, create_schedule
from deltatl.engine.tricks import (DisturbLabel, StochasticLinear, check_stochastic_depth,
                                   install_head_regularization, suspended)
from deltatl.errors import DeltatlError
from deltatl.models import IMAGENET, create_model, head_module, head_name
from deltatl.run import decay_fraction

# --- Dropout / DropConnect on the head ---------------------------------------------------------------


def stochastic_copy(linear: nn.Linear, **rates: float) -> StochasticLinear:
    layer = StochasticLinear(linear.in_features, linear.out_features, **rates)
    layer.load_state_dict(linear.state_dict())
    return layer


def test_the_stochastic_head_is_exactly_the_linear_layer_in_eval_mode():
    torch.manual_seed(0)
    plain, x = nn.Linear(16, 5), torch.randn(8, 16)
    layer = stochastic_copy(plain, dropout=0.5, dropconnect=0.5).eval()
    assert torch.equal(layer(x), plain(x))


def test_dropconnect_masks_weights_only_in_train_mode_and_scales_the_kept_ones():
    torch.manual_seed(0)
    plain = nn.Linear(12, 7)
    layer = stochastic_copy(plain, dropconnect=0.25).train()
    # identity input: row i of the output is column i of the effective weight, plus the bias
    out = layer(torch.eye(12)) - plain.bias
    effective = out.T.detach()
    kept = effective != 0
    assert torch.allclose(effective[kept], (plain.weight / 0.75).detach()[kept])
    assert 0 < kept.float().mean() < 1  # some dropped, some kept
    assert torch.equal(layer(torch.zeros(3, 12)), plain.bias.expand(3, 7))  # the bias is never masked
    layer.eval()
    assert torch.equal(layer(torch.eye(12)), plain(torch.eye(12)))


def test_head_dropout_drops_input_features_only_in_train_mode():
    torch.manual_seed(0)
    plain = nn.Linear(10, 3)
    layer = stochastic_copy(plain, dropout=0.5).train()
    x = torch.ones(2000, 10)
    out = layer(x)
    # Each output is bias + sum_j w_j x_j m_j / (1 - p): its mean over many samples is the plain output.
    assert not torch.allclose(out[0], plain(x[:1])[0])
    assert torch.allclose(out.mean(0), plain(x[:1])[0], atol=0.1)


def test_installing_the_head_tricks_keeps_parameters_keys_and_the_global_rng():
    torch.manual_seed(0)
    model = create_model("test_resnet", 4, pretrained="none")
    name = head_name(model)
    old = head_module(model)
    keys = list(model.state_dict())
    state = torch.random.get_rng_state()
    new = install_head_regularization(model, name, dropout=0.3, dropconnect=0.2)
    assert torch.equal(torch.random.get_rng_state(), state)  # nothing drawn
    assert isinstance(new, StochasticLinear) and head_module(model) is new and head_name(model) == name
    assert new.weight is old.weight and new.bias is old.bias  # optimizer, L2-SP and RIFLE see the same tensors
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    reference = create_model("test_resnet", 4, pretrained="none")
    reference.load_state_dict(model.state_dict())
    assert torch.equal(model(x), reference.eval()(x))


def test_zero_rates_leave_the_model_untouched():
    model = create_model("test_resnet", 4, pretrained="none")
    head = head_module(model)
    assert install_head_regularization(model, head_name(model)) is head
    assert type(head_module(model)) is nn.Linear


# --- Stochastic Depth ---------------------------------------------------------------------------------


def test_drop_path_rate_adds_stochastic_residual_branches_and_nothing_else():
    torch.manual_seed(0)
    plain = create_model("test_resnet", 4, pretrained="none")
    torch.manual_seed(0)
    deep = create_model("test_resnet", 4, pretrained="none", drop_path_rate=0.3)
    from timm.layers import DropPath

    rates = [m.drop_prob for m in deep.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.3) and rates == sorted(rates)  # rising with depth
    plain_state, deep_state = plain.state_dict(), deep.state_dict()
    assert list(plain_state) == list(deep_state)
    assert all(torch.equal(plain_state[k], deep_state[k]) for k in plain_state)  # same draws, same weights
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(plain.eval()(x), deep.eval()(x))  # evaluation is deterministic and unchanged
    deep.train()
    for module in deep.modules():  # timm zero-initialises the last BatchNorm of each residual branch
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
    torch.manual_seed(1)
    a = deep(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, deep(x))  # in training, branches are dropped at random
    check_stochastic_depth(deep, "test_resnet", 0.3)


def test_stochastic_depth_on_a_model_without_residual_branches_is_an_error():
    with pytest.raises(DeltatlError, match="does not support `drop_path_rate`"):
        create_model("inception_v3", 4, pretrained="none", drop_path_rate=0.1)
    with pytest.raises(DeltatlError, match="timm model"):
        create_model("torchvision/resnet18", 4, pretrained="none", drop_path_rate=0.1)
    with pytest.raises(DeltatlError, match="no residual branches"):
        check_stochastic_depth(nn.Sequential(nn.Linear(2, 2)), "mlp", 0.1)


def test_suspended_zeroes_every_trick_rate_and_restores_it():
    model = create_model("test_resnet", 4, pretrained="none", drop_path_rate=0.2)
    head = install_head_regularization(model, head_name(model), dropout=0.5, dropconnect=0.4)
    from timm.layers import DropPath

    before = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    with suspended(model):
        assert all(m.drop_prob == 0 for m in model.modules() if isinstance(m, DropPath))
        assert head.dropout == 0 and head.dropconnect == 0
    assert [m.drop_prob for m in model.modules() if isinstance(m, DropPath)] == before
    assert (head.dropout, head.dropconnect) == (0.5, 0.4)


# --- DisturbLabel ---------------------------------------------------------------------------------------


def test_disturb_label_zero_returns_the_labels_unchanged():
    labels = torch.arange(10) % 4
    assert DisturbLabel(0.0, 4, seed=3)(labels, step=5) is labels


def test_disturb_label_one_gives_uniform_labels_whatever_the_true_ones():
    disturb = DisturbLabel(1.0, 10, seed=0)
    labels = torch.zeros(64, dtype=torch.long)
    drawn = torch.cat([disturb(labels, step) for step in range(300)])
    counts = torch.bincount(drawn, minlength=10).double()
    expected = len(drawn) / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30  # 9 degrees of freedom: p(chi2 > 30) ~ 0.0004


def test_disturb_label_replaces_a_fraction_p_with_uniform_classes():
    disturb = DisturbLabel(0.3, 5, seed=1)
    labels = torch.arange(1000) % 5
    changed = torch.cat([disturb(labels, step) != labels for step in range(20)]).double().mean()
    assert changed == pytest.approx(0.3 * (1 - 1 / 5), abs=0.01)  # a drawn class may be the true one


def test_disturb_label_is_a_function_of_seed_and_step_only():
    labels = torch.arange(32) % 8
    a, b = DisturbLabel(0.5, 8, seed=0), DisturbLabel(0.5, 8, seed=0)
    torch.manual_seed(123)  # the global RNG plays no part
    first = a(labels, 7)
    torch.rand(1000)
    assert torch.equal(first, b(labels, 7))
    assert not torch.equal(first, a(labels, 8))
    assert not torch.equal(first, DisturbLabel(0.5, 8, seed=1)(labels, 7))


def test_under_ddp_each_process_disturbs_its_slice_exactly_as_one_process_on_the_global_batch():
    disturb = DisturbLabel(0.6, 7, seed=2)
    labels = torch.arange(24) % 7
    single = disturb(labels, step=11)
    world, b = 3, 8
    slices = [disturb(labels[r * b:(r + 1) * b], 11, rank=r, world_size=world) for r in range(world)]
    assert torch.equal(torch.cat(slices), single)


def test_disturb_label_bad_probability_is_an_error():
    with pytest.raises(DeltatlError):
        DisturbLabel(1.5, 3)
    with pytest.raises(DeltatlError, match="`disturb_label`"):
        TrainConfig(disturb_label=-0.1)


# --- training runs with the tricks -------------------------------------------------------------------


def checkpoint_model(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]


def test_each_trick_at_rate_zero_equals_the_plain_run_and_each_changes_the_run(cli, image_folder,
                                                                              tiny_train_args, tmp_path):
    data = image_folder()
    runs = {"plain": [], "zero": ["--head-dropout", "0", "--head-dropconnect", "0", "--drop-path-rate", "0",
                                  "--disturb-label", "0"],
            "dropout": ["--head-dropout", "0.5"], "dropconnect": ["--head-dropconnect", "0.5"],
            "drop-path": ["--drop-path-rate", "0.3"], "disturb": ["--disturb-label", "0.5"]}
    weights = {}
    for name, flags in runs.items():
        torch.manual_seed(0)
        result = cli("train", "--data", data, *tiny_train_args, *flags, "--out", tmp_path / name)
        assert result.code == 0, result.err
        weights[name] = checkpoint_model(tmp_path / name)
    plain = weights.pop("plain")
    assert all(torch.equal(plain[k], weights["zero"][k]) for k in plain)
    for name in ("dropout", "dropconnect", "drop-path", "disturb"):
        assert list(weights[name]) == list(plain), name  # same architecture, same checkpoint keys
        assert any(not torch.equal(plain[k], weights[name][k]) for k in plain), name


def test_delta_attention_is_computed_without_the_tricks(cli, image_folder, tiny_train_args, tmp_path):
    data = image_folder()
    attention = ["--method", "delta", "--attention-epochs", "1", "--attention-batches", "1",
                 "--attention-batch-size", "4"]
    scores = {}
    for name, flags in (("plain", []), ("tricks", ["--head-dropout", "0.5", "--drop-path-rate", "0.3"])):
        torch.manual_seed(0)
        result = cli("train", "--data", data, *tiny_train_args, *attention, *flags, "--out", tmp_path / name,
                     "--attention-cache", tmp_path / f"cache-{name}")  # separate caches: both computed
        assert result.code == 0, result.err
        scores[name] = json.loads((tmp_path / name / "attention.json").read_text())
    assert scores["plain"] == scores["tricks"]


def test_a_run_with_every_trick_interrupted_and_resumed_equals_the_uninterrupted_run(
        cli, image_folder, tiny_train_args, tmp_path, monkeypatch):
    from test_resume import assert_same_result, interrupt_forward_at

    data = image_folder()
    args = [a for a in tiny_train_args if a not in ("--epochs", "1")]
    flags = ["--epochs", "2", "--method", "l2-sp", "--head-dropout", "0.3", "--head-dropconnect", "0.3",
             "--drop-path-rate", "0.2", "--disturb-label", "0.4", "--schedule", "triangular", "--lr-cycles", "2"]
    torch.manual_seed(0)
    assert cli("train", "--data", data, *args, *flags, "--out", tmp_path / "reference").code == 0
    interrupt_forward_at(monkeypatch, 6, "l2-sp")  # mid-epoch 2
    torch.manual_seed(0)
    assert cli("train", "--data", data, *args, *flags, "--out", tmp_path / "run").code == 130
    torch.manual_seed(0)
    resumed = cli("train", "--data", data, *args, *flags, "--out", tmp_path / "run", "--resume")
    assert resumed.code == 0, resumed.err
    assert_same_result(tmp_path / "run", tmp_path / "reference")


# --- learning-rate schedules ----------------------------------------------------------------------------


def lrs(name: str, total: int, **kwargs) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = create_schedule(optimizer, name, total, steps_per_epoch=kwargs.pop("spe", 10), **kwargs)
    out = []
    for step in range(total):
        scheduler.step_update(step)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_the_step_schedule_divides_by_ten_after_exactly_decay_at_steps():
    config = TrainConfig(iters=9000, decay_at=6000)
    rates = lrs("step", 9000, decay_fraction=decay_fraction(config, 9000))
    assert rates[5999] == pytest.approx(0.1) and rates[6000] == pytest.approx(0.01)
    assert rates.index(rates[-1]) == 6000
    assert decay_fraction(TrainConfig(), 90) == pytest.approx(2 / 3)
    with pytest.raises(DeltatlError, match="beyond"):
        decay_fraction(TrainConfig(decay_at=100), 90)


def test_the_exponential_schedule_reaches_a_tenth_at_decay_at_with_one_factor_per_epoch():
    # Stanford Dogs: 12,000 images / 64 = 187 steps per epoch; 6000 steps = 32 epochs, 0.93 per epoch
    rates = lrs("exp", 9000, spe=187, decay_fraction=6000 / 9000)
    per_epoch = rates[187] / rates[0]
    assert per_epoch == pytest.approx(0.93, abs=0.001)
    assert len(set(rates[:187])) == 1  # constant within an epoch
    assert rates[32 * 187] == pytest.approx(0.01, rel=0.01)


@pytest.mark.parametrize("cycles", [1, 3, 4])
def test_cosine_restarts_start_every_cycle_at_the_full_rate_and_anneal_to_the_floor(cycles):
    total = 120
    rates = lrs("cosine-restarts", total, cycles=cycles, min_factor=0.1)
    starts = [round(i * total / cycles) for i in range(cycles)]
    assert [rates[s] for s in starts] == [pytest.approx(0.1)] * cycles
    for s in starts:
        assert rates[s + 1] < rates[s]
    assert min(rates) >= 0.01 - 1e-12 and rates[-1] < 0.012


def test_the_triangular_schedule_rises_from_the_floor_to_the_peak_at_mid_cycle():
    rates = lrs("triangular", 100, cycles=2, min_factor=0.25)
    assert rates[0] == pytest.approx(0.025) and rates[50] == pytest.approx(0.025)
    assert rates[25] == pytest.approx(0.1) and rates[75] == pytest.approx(0.1)
    assert rates[10] == pytest.approx(0.025 + 0.075 * 20 / 50)


def test_too_many_cycles_are_an_error():
    with pytest.raises(DeltatlError, match="`lr_cycles`"):
        CyclicLRScheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), "triangular", 5, 6)


# --- aspect-keeping resize and 10-crop testing ---------------------------------------------------------


def wide_image(width: int = 96, height: int = 48) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_keep_aspect_resizes_the_shorter_edge_and_keeps_the_ratio():
    resize = evaluation_transform(32, IMAGENET, 40, keep_aspect=True).transforms[0]
    assert resize(wide_image(96, 48)).size == (80, 40)
    assert resize(wide_image(30, 60)).size == (40, 80)
    square = eval_transform(32, IMAGENET, 40).transforms[0]
    assert square(wide_image(96, 48)).size == (40, 40)  # the official square resize, unchanged
    assert train_transform(32, IMAGENET, 40, keep_aspect=True)(wide_image()).shape == (3, 32, 32)
    assert eval_transform(32, IMAGENET, 40, keep_aspect=True)(wide_image()).shape == (3, 32, 32)


def test_a_resize_smaller_than_the_crop_is_an_error():
    with pytest.raises(DeltatlError, match="smaller than"):
        train_transform(32, IMAGENET, 24, keep_aspect=True)


def test_ten_crop_gives_the_corners_the_centre_and_their_mirror_images():
    image = wide_image()
    stack = ten_crop_transform(32, IMAGENET, 40, keep_aspect=True)(image)
    assert stack.shape == (10, 3, 32, 32)
    # TenCrop: tl, tr, bl, br, centre, then the same of the mirrored image (whose tl mirrors the tr...)
    assert torch.equal(stack[5:], stack[[1, 0, 3, 2, 4]].flip(-1))
    single = eval_transform(32, IMAGENET, 40, keep_aspect=True)(image)
    assert torch.equal(stack[4], single)  # the centre crop is the single-crop test input


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def tiny_set(n: int = 7, ten_crop: bool = True) -> TransformedImages:
    rng = np.random.default_rng(1)
    images = ArrayImages(rng.integers(0, 255, (n, 40, 56, 3), dtype=np.uint8), [i % 3 for i in range(n)],
                         ["a", "b", "c"], "test")
    return TransformedImages(images, evaluation_transform(24, IMAGENET, 32, keep_aspect=True, ten_crop=ten_crop))


def test_ten_crop_evaluation_scores_the_mean_logits_of_the_ten_crops():
    model, dataset = tiny_model(), tiny_set()
    with torch.no_grad():
        logits = []
        for i in range(len(dataset)):
            crops, _ = dataset[i]
            logits.append(torch.stack([model(crop[None])[0] for crop in crops]).mean(0))
        logits = torch.stack(logits)
        labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
        assert torch.allclose(crop_logits(model, torch.stack([dataset[i][0] for i in range(len(dataset))])),
                              logits, atol=1e-6)
    result = evaluate(model, dataset, batch_size=3, device=torch.device("cpu"), progress=False)
    assert result["n"] == len(dataset)
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert result["top1"] == pytest.approx(100 * (logits.argmax(1) == labels).double().mean().item())


class _LocalShard(DistEnv):
    """One process of a DDP evaluation with the all-reduce left to the test (no process group)."""

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def test_ten_crop_evaluation_is_exact_under_ddp_sharding():
    model, dataset = tiny_model(), tiny_set(n=7)
    single = evaluate(model, dataset, batch_size=2, device=torch.device("cpu"), progress=False)
    correct = loss = n = 0.0
    for rank in range(3):
        part = evaluate(model, dataset, batch_size=2, device=torch.device("cpu"), progress=False,
                        dist=_LocalShard(rank=rank, world_size=3))
        correct += part["top1"] * part["n"] / 100
        loss += part["loss"] * part["n"]
        n += part["n"]
    assert n == single["n"] == 7
    assert 100 * correct / n == pytest.approx(single["top1"])
    assert loss / n == pytest.approx(single["loss"], rel=1e-6)


def test_a_ten_crop_run_end_to_end(cli, image_folder, tiny_train_args, tmp_path):
    data = image_folder(size=40)
    result = cli("train", "--data", data, *tiny_train_args, "--keep-aspect", "--ten-crop", "--resize", "36",
                 "--out", tmp_path / "run")
    assert result.code == 0, result.err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["ten_crop"] and summary["test_top1"] is not None
    evaluated = cli("eval", tmp_path / "run", "--device", "cpu", "--quiet")
    assert evaluated.code == 0, evaluated.err
    assert f"{summary['test_top1']:.2f}%" in evaluated.out  # eval uses the run's 10-crop transform


def test_compare_takes_the_trick_flags_for_every_method_and_seed(cli, image_folder, tiny_train_args, tmp_path):
    args = [a for a in tiny_train_args if a not in ("--epochs", "1")] + ["--epochs", "2"]  # RIFLE: 2 periods
    result = cli("compare", "--data", image_folder(), *args, "--methods", "l2", "l2-sp+rifle1",
                 "--seeds", "2", "--head-dropout", "0.5", "--disturb-label", "0.1", "--out", tmp_path / "cmp")
    assert result.code == 0, result.err
    configs = sorted((tmp_path / "cmp").rglob("config.yaml"))
    assert len(configs) == 4
    for path in configs:
        text = path.read_text()
        assert "head_dropout: 0.5" in text and "disturb_label: 0.1" in text
