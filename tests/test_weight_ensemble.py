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
    # the fine-tuning is an LP-FT run of the same settings, in a subfolder
    assert "method: lp-ft" in (run / "fine_tuned" / "config.yaml").read_text()
    assert summary["method"] == "wise-ft" and summary["wise_ft"]["fine_tuned"] == "fine_tuned"
    probe = torch.load(run / "fine_tuned" / "linear_probe" / "checkpoint.pt", weights_only=True)["model"]
    fine_tuned = torch.load(run / "fine_tuned" / "checkpoint.pt", weights_only=True)["model"]
    ensemble = torch.load(run / "checkpoint.pt", weights_only=True)
    expected = interpolate(probe, fine_tuned, chosen)
    assert all(torch.allclose(ensemble["model"][k].float(), expected[k].float(), atol=1e-6) for k in expected)
    assert ensemble["run_info"]["method"] == "wise-ft"
    fine_tuning = json.loads((run / "fine_tuned" / "summary.json").read_text())
    assert summary["seconds"] > fine_tuning["seconds"]  # its cost: the LP-FT run's and the ensemble's
    evaluated = cli("eval", run)
    assert evaluated.code == 0
    assert f"top-1 {summary['test_top1']:.2f}%" in evaluated.out
    assert cli("train", *flags).code == 0  # finished: reused


def test_wise_ft_from_a_finished_lp_ft_run_reuses_it_and_equals_its_own_fine_tuning(cli, image_folder, tmp_path):
    data = image_folder(val=2)
    flags = ["--data", data, *TINY_TRAIN_ARGS, "--epochs", "2", "--attention-epochs", "2",
             "--attention-batch-size", "4"]
    lp_ft = tmp_path / "lp-ft"
    assert cli("train", *flags, "--method", "lp-ft", "--out", lp_ft).code == 0
    trained = (lp_ft / "checkpoint.pt").stat().st_mtime_ns
    own, reused = tmp_path / "own", tmp_path / "reused"
    assert cli("train", *flags, "--method", "wise-ft", "--out", own).code == 0
    result = cli("train", *flags, "--method", "wise-ft", "--fine-tuned", lp_ft, "--out", reused)
    assert result.code == 0, result.err
    assert (lp_ft / "checkpoint.pt").stat().st_mtime_ns == trained  # reused, not trained again
    assert not (reused / "fine_tuned").exists()
    a, b = (json.loads((run / "summary.json").read_text()) for run in (own, reused))
    assert a["wise_ft"]["val_top1"] == b["wise_ft"]["val_top1"] and a["test_top1"] == b["test_top1"]
    # an LP-FT run of other settings is refused, naming what differs
    other = cli("train", *flags, "--method", "wise-ft", "--fine-tuned", lp_ft, "--seed", "1", "--out",
                tmp_path / "other")
    assert other.code != 0 and "differs in: seed" in other.err and "Traceback" not in other.err
    # nor can the run interpolate itself
    itself = cli("train", *flags, "--method", "wise-ft", "--fine-tuned", tmp_path / "self", "--out", tmp_path / "self")
    assert itself.code != 0 and "not this run's own folder" in itself.err
    # and a method that interpolates nothing refuses it
    refused = cli("train", *flags, "--method", "l2", "--fine-tuned", lp_ft, "--out", tmp_path / "l2")
    assert refused.code != 0 and "wise-ft" in refused.err
