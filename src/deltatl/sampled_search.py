"""``deltatl search --alpha-range LOW HIGH --trials N``: Optuna's TPE sampler chooses, a pruner stops.

The same k-fold protocol as the grid search (:mod:`deltatl.search`): every trial is a point whose runs
train on k-1 folds and validate on the last, its value the mean validation top-1 over the folds, and
the best trial is refit once on the whole training split and scored once on the test split. Here the
points are not given: Optuna's TPE sampler (seeded) draws each parameter log-uniformly from its
range, learning from the trials done, and after each fold the trial reports its running mean so that
the median pruner stops a trial whose first folds score below the median of earlier trials at the
same fold. Workers on several machines share the study through its storage (SQLite in ``--out`` by
default, PostgreSQL with ``--storage``) and stop together once ``--trials`` trials are finished
(complete or pruned); fold runs are run directories like any other, reused when finished.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from .config import TrainConfig
from .data.folds import stratified_folds, write_folds
from .data.images import ImageCollection
from .errors import DeltatlError, when_free
from .methods import get_method
from .outputs import atomic_open, check_output_folder
from .search import (OWN_FILES, PARAMS, STUDY_FILE, _check_spec, _first_line, fold_config, open_storage,
                     point_label, redact, refit_config, stored_where)

SAMPLED_RULE = "highest mean validation top-1 over the folds among the complete trials (TPE sampler, median pruner)"


@dataclass(frozen=True)
class Ranges:
    """Log-uniform ranges ``(low, high)``; a parameter without one keeps the base config's value."""

    alpha: tuple[float, float] | None = None
    beta: tuple[float, float] | None = None
    lr: tuple[float, float] | None = None

    def names(self) -> list[str]:
        return [n for n in PARAMS if getattr(self, n) is not None]

    def as_dict(self) -> dict[str, list[float]]:
        return {n: list(getattr(self, n)) for n in self.names()}


def check_sampled_search(base: TrainConfig, ranges: Ranges, folds: int, trials: int, out: str) -> None:
    """Validate before anything is written."""
    method = get_method(base.method)
    if base.cv_folds is not None:
        raise DeltatlError("the base settings of a search must not set cv_folds / cv_fold")
    if not ranges.names():
        raise DeltatlError("give `alpha_range` (and optionally `beta_range`, `lr_range`), or grids")
    for name in ranges.names():
        low, high = getattr(ranges, name)
        if not (0 < low < high and math.isfinite(high)):
            raise DeltatlError(f"`{name}_range` needs 0 < LOW < HIGH (log-uniform), got {low:g} {high:g}")
    if (ranges.alpha and not method.uses("alpha")) or (ranges.beta and not method.uses("beta")):
        raise DeltatlError(f"method '{base.method}' has no alpha or beta to search (`lr_range` works with any method)")
    if folds < 2:
        raise DeltatlError(f"`folds` must be at least 2, got {folds}")
    if trials < 1:
        raise DeltatlError(f"`trials` must be at least 1, got {trials}")
    check_output_folder(out, "search", OWN_FILES)


def sampled_search(base: TrainConfig, train_split: ImageCollection, ranges: Ranges, out: str, *, trials: int,
                   folds: int = 5, storage: str | None = None, study_name: str = "deltatl-search-tpe",
                   sampler_seed: int = 0, prune: bool = True, train: Callable[[TrainConfig], dict[str, Any]],
                   poll_seconds: float = 10.0, heartbeat_seconds: int = 60,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one worker until the study has ``trials`` finished trials, refit the best once; return the results."""
    log = log or (lambda msg: print(f"deltatl search: {msg}", file=sys.stderr))
    check_sampled_search(base, ranges, folds, trials, out)
    fold_lists = stratified_folds(train_split.targets, folds, base.seed, train_split.classes)
    url = storage or f"sqlite:///{os.path.abspath(os.path.join(out, STUDY_FILE))}"
    os.makedirs(out, exist_ok=True)
    rdb = open_storage(url, heartbeat_seconds)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0) if prune
              else optuna.pruners.NopPruner())
    try:
        study = optuna.create_study(storage=rdb, study_name=study_name, direction="maximize", load_if_exists=True,
                                    sampler=optuna.samplers.TPESampler(seed=sampler_seed), pruner=pruner)
    except Exception as exc:  # noqa: BLE001  (any database error, as one line)
        raise DeltatlError(f"cannot open study '{study_name}' in {redact(url)}: {_first_line(exc)}") from None
    _check_spec(study, _spec(base, ranges, folds, trials, train_split, fold_lists), redact(url))
    write_folds(os.path.join(out, "folds"), train_split, fold_lists)

    def objective(trial: optuna.Trial) -> float:
        point = {n: trial.suggest_float(n, *getattr(ranges, n), log=True) for n in ranges.names()}
        scores: list[float] = []
        for fold in range(folds):
            summary = train(fold_config(base, point, folds, fold, out))
            scores.append(float(summary["val_top1"]))
            trial.set_user_attr("val_top1", scores)
            trial.report(statistics.fmean(scores), fold)
            if fold < folds - 1 and trial.should_prune():
                log(f"trial {trial.number} ({point_label(point)}) pruned after {fold + 1} fold(s)")
                raise optuna.TrialPruned()
        log(f"trial {trial.number} ({point_label(point)}): mean {statistics.fmean(scores):.2f}")
        return statistics.fmean(scores)

    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    stop = optuna.study.MaxTrialsCallback(trials, states=finished)
    log(f"study '{study_name}' in {redact(url)}: {trials} trials of {folds} folds, TPE (seed {sampler_seed})"
        f"{', median pruner' if prune else ''}")
    if len(study.get_trials(deepcopy=False, states=finished)) < trials:
        study.optimize(objective, callbacks=[stop], catch=())
    while study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # other workers' last trials
        time.sleep(poll_seconds)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise DeltatlError(f"every trial of study '{study_name}' was pruned or failed: widen the ranges or "
                           f"add trials")
    best = max(complete, key=lambda t: (t.value, -t.number))  # ties: the earlier trial
    # the refit, trained by one worker: the others wait for its run directory to finish, then reuse it
    refit = when_free(lambda: train(refit_config(base, best.params, out)), poll_seconds)
    results = _results(base, ranges, folds, study, best, refit, out)
    results["storage"] = stored_where(storage)
    results["figures"] = write_figures(study, out, len(ranges.names()))
    write_sampled_results(out, results)
    return results


def write_figures(study: optuna.Study, out: str, parameters: int) -> list[str]:
    """Optuna's own plots, where they apply: the optimisation history, and with two or more searched
    parameters their importances (fANOVA). Needs matplotlib (the ``analysis`` extra); without it, none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from optuna.visualization import matplotlib as plots
    except ImportError:
        return []
    import warnings

    figures = [("optimization_history.png", plots.plot_optimization_history)]
    if parameters >= 2:
        figures.append(("param_importances.png", plots.plot_param_importances))
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, plot in figures:
            axes = plot(study)
            figure = axes.figure
            figure.set_size_inches(7, 4)
            figure.tight_layout()
            with atomic_open(os.path.join(out, name), "wb") as f:
                figure.savefig(f, format="png", dpi=100)
            matplotlib.pyplot.close(figure)
            written.append(name)
    return written


def _spec(base: TrainConfig, ranges: Ranges, folds: int, trials: int, train_split: ImageCollection,
          fold_lists: Any) -> dict[str, Any]:
    from .search import Grid, _spec as grid_spec

    spec = grid_spec(base, Grid(), folds, train_split, fold_lists)
    spec["grid"] = {"ranges": ranges.as_dict(), "trials": trials}
    spec["config"] = {k: v for k, v in spec["config"].items() if k not in ranges.names()}
    return spec


def _results(base: TrainConfig, ranges: Ranges, folds: int, study: optuna.Study, best: Any,
             refit: dict[str, Any], out: str) -> dict[str, Any]:
    trials = [{"number": t.number, "state": t.state.name.lower(), "params": t.params,
               "val_top1": t.user_attrs.get("val_top1", []), "mean": t.value}
              for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    return {"method": base.method, "rifle": base.rifle, "folds": folds, "ranges": ranges.as_dict(),
            "trials": trials, "chosen": best.params, "chosen_trial": best.number, "chosen_mean": best.value,
            "rule": SAMPLED_RULE,
            "refit": {"run_dir": os.path.relpath(refit_config(base, best.params, out).out, out),
                      "test_top1": refit.get("test_top1"),
                      "train_images": refit.get("train_images")}}


def sampled_markdown(results: dict[str, Any]) -> str:
    names = list(results["ranges"])
    k = results["folds"]
    head = ["trial", *names, *(f"fold {f}" for f in range(k)), "mean", "state"]
    lines = [f"# deltatl search: {results['method']}, {k}-fold cross-validation, TPE sampler", "",
             "Ranges (log-uniform): " + ", ".join(f"{n} {lo:g} .. {hi:g}" for n, (lo, hi) in results["ranges"].items()),
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in results["trials"]:
        scores = [f"{v:.2f}" for v in t["val_top1"]] + ["-"] * (k - len(t["val_top1"]))
        mean = "-" if t["state"] != "complete" else f"{t['mean']:.2f}"
        row = [str(t["number"]), *(f"{t['params'][n]:.3g}" for n in names), *scores, mean, t["state"]]
        if t["number"] == results["chosen_trial"]:
            row = [f"**{c}**" for c in row]
        lines.append("| " + " | ".join(row) + " |")
    refit = results["refit"]
    test = "-" if refit.get("test_top1") is None else f"{refit['test_top1']:.2f} %"
    lines += ["", f"Chosen: {', '.join(f'{n} = {v:.3g}' for n, v in results['chosen'].items())} "
                  f"(trial {results['chosen_trial']}; {results['rule']}).",
              f"Refit on the whole training split ({refit.get('train_images', '?')} images): test top-1 {test}."]
    lines += [""] + [f"![{name[:-4].replace('_', ' ')}]({name})" for name in results.get("figures", [])]
    return "\n".join(lines).rstrip() + "\n"


def write_sampled_results(out: str, results: dict[str, Any]) -> None:
    import json

    for name, text in (("search.json", json.dumps(results, indent=2) + "\n"), ("search.md", sampled_markdown(results))):
        with atomic_open(os.path.join(out, name)) as f:
            f.write(text)
