"""WiSE-FT: the interpolation, the choice of its coefficient on validation, and a run end to end."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_TRAIN_ARGS
from deltatl.engine.weight_ensemble import MIXING_GRID, choose_mixing, interpolate


def states() -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(3, 4, generator=g), "bn.running_var": torch.rand(4, generator=g) + 0.5,
             "bn.num_batches_tracked": torch.tensor(3)}
    end = {"w": torch.randn(3, 4, generator=g), "bn.running_var": torch.rand(4, generator=g) + 0.5,
           "bn.num_batches_tracked": torch.tensor(40)}
    return start, end


def test_the_endpoints_are_exact_and_between_them_every_float_tensor_is_interpolated():
    start, end = states()
    assert all(torch.equal(interpolate(start, end, 0)[k], start[k]) for k in ("w", "bn.running_var"))
    assert all(torch.equal(interpolate(start, end, 1)[k], end[k]) for k in start)
    half = interpolate(start, end, 0.3)
    for key in ("w", "bn.running_var"):  # BatchNorm statistics too
        assert torch.allclose(half[key], 0.7 * start[key] + 0.3 * end[key], atol=1e-6)
    assert half["bn.num_batches_tracked"].item() == 40  # a count is not interpolated
    with pytest.raises(ValueError, match="different tensors"):
        interpolate(start, {"w": end["w"]}, 0.5)


def test_the_coefficient_is_the_best_on_validation_ties_going_to_the_earlier_one():
    start, end = states()
    model = torch.nn.Module()
    model.register_buffer("w", start["w"].clone())
    model.bn = torch.nn.Module()
    model.bn.register_buffer("running_var", start["bn.running_var"].clone())
    model.bn.register_buffer("num_batches_tracked", torch.tensor(0))
    # a validation score that rises to a plateau from 0.7 to 0.9, then drops: the earliest best wins
    plateau = {0.7: 90.0, 0.8: 90.0, 0.9: 90.0, 1.0: 85.0}

    def validate(m: torch.nn.Module) -> float:
        a = round(((m.w - start["w"]) / (end["w"] - start["w"]))[0, 0].item(), 1)  # which interpolation
        return plateau.get(a, 50.0 + a)

    mixing, scores = choose_mixing(model, start, end, validate)
    target = interpolate(start, end, 0.7)["w"]
    assert mixing == 0.7 and set(scores) == set(MIXING_GRID)
    assert torch.allclose(model.w, target)  # left holding the chosen interpolation


def test_a_wise_ft_run_reports_the_ensemble_that_eval_reproduces(cli, image_folder, tmp_path):
    run = tmp_path / "wise"
    flags = ["--data", image_folder(val=2), *TINY_TRAIN_ARGS, "--epochs", "2", "--method", "wise-ft",
             "--attention-epochs", "2", "--attention-batch-size", "4", "--out", run]
    result = cli("train", *flags)
    assert result.code == 0, result.err
    summary = json.loads((run / "summary.json").read_text())
    chosen = summary["wise_ft"]["mixing"]
    assert summary["val_top1"] == summary["wise_ft"]["val_top1"][f"{chosen:g}"] == max(
        summary["wise_ft"]["val_top1"].values())
    probe = torch.load(run / "linear_probe" / "checkpoint.pt", weights_only=True)["model"]
    fine_tuned = torch.load(run / "fine_tuned" / "checkpoint.pt", weights_only=True)["model"]
    ensemble = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    expected = interpolate(probe, fine_tuned, chosen)
    assert all(torch.allclose(ensemble[k].float(), expected[k].float(), atol=1e-6) for k in expected)
    # the test split is scored once, on the ensemble: not on the fine-tuned end
    assert json.loads((run / "fine_tuned" / "summary.json").read_text())["test_top1"] is None
    evaluated = cli("eval", run)
    assert evaluated.code == 0
    assert f"top-1 {summary['test_top1']:.2f}%" in evaluated.out
    assert cli("train", *flags).code == 0  # finished: reused
