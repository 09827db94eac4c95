"""``deltatl search --alpha-range``: Optuna's TPE sampler chooses the points, the median pruner stops trials."""
from __future__ import annotations

import json
import math

import pytest

from test_search import FakeTrainer, train_split
from deltatl.cli import main
from deltatl.config import TrainConfig
from deltatl.errors import DeltatlError
from deltatl.sampled_search import Ranges, sampled_search


def peaked(alpha: float, fold: int) -> float:
    """Validation scores peaking at alpha = 1e-2 (every fold alike, fold 1 a little higher)."""
    return 90.0 - 10.0 * abs(math.log10(alpha) + 2.0) + fold


def run(out, trainer, trials=8, **kwargs):
    return sampled_search(TrainConfig(method="l2-sp"), train_split(), Ranges(alpha=(1e-5, 1.0)), str(out),
                          trials=trials, folds=2, train=trainer, poll_seconds=0.01, log=lambda msg: None, **kwargs)


def test_the_sampler_draws_in_the_range_prunes_the_hopeless_and_refits_the_best_once(tmp_path):
    trainer = FakeTrainer(peaked)
    results = run(tmp_path / "s", trainer, trials=12)
    assert len(results["trials"]) == 12
    alphas = [t["params"]["alpha"] for t in results["trials"]]
    assert all(1e-5 <= a <= 1.0 for a in alphas) and len(set(alphas)) == 12
    complete = [t for t in results["trials"] if t["state"] == "complete"]
    pruned = [t for t in results["trials"] if t["state"] == "pruned"]
    assert pruned and all(len(t["val_top1"]) == 1 for t in pruned)  # stopped after their first fold
    best = max(complete, key=lambda t: t["mean"])
    assert results["chosen"] == best["params"] and results["chosen_mean"] == best["mean"]
    assert trainer.refits() == [best["params"]["alpha"]]
    assert (tmp_path / "s" / "search.md").read_text().count("| pruned |") == len(pruned)
    assert json.loads((tmp_path / "s" / "search.json").read_text())["chosen_trial"] == results["chosen_trial"]
    assert results["figures"] == ["optimization_history.png"]  # one parameter: no importances
    assert (tmp_path / "s" / "optimization_history.png").stat().st_size > 1000
    assert "![optimization history](optimization_history.png)" in (tmp_path / "s" / "search.md").read_text()
    # the same seed draws the same points; a finished study is reused, nothing trained again but the refit
    again = FakeTrainer(peaked)
    assert run(tmp_path / "s", again, trials=12)["chosen"] == results["chosen"]
    assert again.fold_calls() == {} and len(again.refits()) == 1


def test_without_pruning_every_trial_runs_every_fold_and_two_parameters_get_importances(tmp_path):
    def score(config):
        return {"val_top1": peaked(config.alpha, config.cv_fold or 0) - 100 * abs(config.lr - 0.01),
                "test_top1": 70.0, "seconds": 1.0}

    results = sampled_search(TrainConfig(method="l2-sp"), train_split(), Ranges(alpha=(1e-5, 1.0), lr=(1e-3, 0.1)),
                             str(tmp_path / "s"), trials=6, folds=2, train=score, prune=False, log=lambda m: None)
    assert all(t["state"] == "complete" and len(t["val_top1"]) == 2 for t in results["trials"])
    assert set(results["chosen"]) == {"alpha", "lr"}
    assert results["figures"] == ["optimization_history.png", "param_importances.png"]


def test_another_search_in_the_same_study_is_refused(tmp_path):
    run(tmp_path / "s", FakeTrainer(peaked), trials=2)
    with pytest.raises(DeltatlError, match="holds another search"):
        run(tmp_path / "s", FakeTrainer(peaked), trials=3)


@pytest.mark.parametrize("flags, fragment", [
    (["--alpha-range", "0.1", "0.01"], "needs 0 < LOW < HIGH"),
    (["--alpha-range", "0", "0.01"], "needs 0 < LOW < HIGH"),
    (["--alpha-range", "1e-4", "0.1", "--alpha-grid", "0.01"], "either grids"),
    (["--alpha-range", "1e-4", "0.1", "--trials", "0"], "must be at least 1"),
])
def test_bad_ranges_are_one_error_line(capsys, tmp_path, flags, fragment):
    try:
        code = main(["search", "--method", "l2-sp", *flags, "--out", str(tmp_path / "s")])
    except SystemExit as exc:  # refused by the parser itself
        code = exc.code
    assert code == 2
    assert fragment in capsys.readouterr().err


def test_a_real_tpe_search_on_the_tiny_model_trains_its_folds_and_refit(cli, image_folder, tmp_path):
    from conftest import TINY_TRAIN_ARGS

    out = tmp_path / "tpe"
    result = cli("search", "--data", image_folder(), *TINY_TRAIN_ARGS, "--method", "l2-sp",
                 "--alpha-range", "1e-4", "1e-1", "--trials", "3", "--folds", "2", "--poll", "0.01", "--out", out)
    assert result.code == 0, result.err
    results = json.loads((out / "search.json").read_text())
    assert len(results["trials"]) == 3
    for trial in results["trials"]:
        for fold, score in enumerate(trial["val_top1"]):
            run = out / "trials" / f"alpha{trial['params']['alpha']!r}" / f"fold{fold}"
            assert json.loads((run / "summary.json").read_text())["val_top1"] == score
    refit = json.loads((out / "refit" / f"alpha{results['chosen']['alpha']!r}" / "summary.json").read_text())
    assert refit["test_top1"] == results["refit"]["test_top1"] and "TPE sampler" in result.out
