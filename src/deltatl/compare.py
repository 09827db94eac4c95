"""``deltatl compare``: methods x seeds on one dataset with one budget, as a Table-1-style result.

Method specs are method names with an optional RIFLE suffix: ``delta``, ``l2-sp``, ``delta+rifle3``.
When an alpha grid is given (one for all methods, or one per method: the regularizers' scales
differ), the alpha of each method that has one is chosen on the *validation* split of the first seed (highest val top-1; ties go to the earlier grid value), then used for every
seed; a ``+rifle`` variant uses its base method's alpha. The test split plays no part in any choice.
Every run keeps its own directory; runs that already finished are reused, not recomputed.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
import time
from dataclasses import replace
from typing import Any, Callable, Collection, Sequence

from .config import TrainConfig, parse_grid_values
from .methods import fine_tuning_of, get_method
from .errors import DeltatlError, RunInUse, when_free
from .outputs import atomic_open, check_output_folder

# What compare writes in its folder: the tables, and a folder per method spec (l2, delta+rifle3...).
OWN_FILES = ("results*.md", "results*.csv", "paired*.csv", "alpha_selection*.json", "*.tmp")
_SPEC = re.compile(r"^(?P<method>[a-z0-9+-]+?)(\+rifle(?P<rifle>\d+))?$")


def parse_spec(spec: str) -> tuple[str, int]:
    match = _SPEC.match(spec)
    if not match:
        raise DeltatlError(f"bad method spec '{spec}' (expected e.g. delta, l2-sp or delta+rifle3)")
    get_method(match["method"])
    return match["method"], int(match["rifle"] or 0)


def settings_tag(config: TrainConfig) -> str:
    """``"source-bn-running_reduction-sum"``: the folder of DELTA runs names their term's settings (and
    stays the same when the defaults change), so runs of both settings share one comparison folder and
    its baseline runs; likewise RIFLE's switches (``rifle-cyclic-lr``, ``rifle-reset-momentum``) when
    set on a run that re-initialises; "" when none applies."""
    parts = []
    if get_method(config.method).feature_maps:
        parts.append(f"source-bn-{config.delta_source_bn}_reduction-{config.delta_reduction}")
    if config.rifle:
        parts += [name for name, on in (("rifle-cyclic-lr", config.rifle_cyclic_lr),
                                        ("rifle-reset-momentum", config.rifle_reset_momentum)) if on]
    return "_".join(parts)


def _is_spec(name: str) -> bool:
    try:
        parse_spec(name)
    except DeltatlError:
        return False
    return True


def _run_config(base: TrainConfig, out: str, spec: str, seed: int, alpha: float | None) -> TrainConfig:
    method, rifle = parse_spec(spec)
    config = replace(base, method=method, rifle=rifle, seed=seed, alpha=base.alpha if alpha is None else alpha)
    parts = [spec, settings_tag(config), "" if alpha is None else f"alpha{alpha:g}", f"seed{seed}"]
    return replace(config, out=os.path.join(out, *[p for p in parts if p]))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def parse_alpha_grid(items: Sequence[str]) -> dict[str, list[float]]:
    """``["0.01", "0.1"]`` (every method) or ``["delta=1e-4,1e-3", "l2-sp=0.01"]`` -> method -> grid.

    The key ``"*"`` holds the grid of methods not named.
    """
    grids: dict[str, list[float]] = {}
    for item in items:
        method, _, values = item.rpartition("=")
        numbers = list(parse_grid_values("`alpha_grid`", [values]))
        if not numbers:
            raise DeltatlError(f"bad `alpha_grid` item '{item}' (e.g. 0.01 or delta=1e-4,1e-3)")
        if method:
            get_method(method)
        grids.setdefault(method or "*", []).extend(numbers)
    return grids


def compare(base: TrainConfig, specs: Sequence[str], seeds: Sequence[int], out: str,
            alpha_grid: dict[str, Sequence[float]] | Sequence[float] = (), *,
            train: Callable[[TrainConfig], dict[str, Any]], poll_seconds: float = 10.0,
            table: str = "") -> list[dict[str, Any]]:
    """Run (or reuse) every (method, seed) and return one aggregated row per method spec.

    Several processes may run the same comparison into one ``out`` and share its runs: a run another
    process is training (:class:`~deltatl.errors.RunInUse`) is left to it and its result read once it
    has finished, so each process goes on with the runs nobody has taken.

    Args:
        alpha_grid: candidate alphas, for every method or per method (see :func:`parse_alpha_grid`).
        train: runs one config and returns its summary (``deltatl.run.train_run`` with options bound).
        poll_seconds: how often to look again at runs that other processes train, once no other is left.
        table: names this comparison's table files (``results-<table>.md``...), so that comparisons of
            other methods sharing ``out`` and its runs keep their own tables.
    """
    grids = dict(alpha_grid) if isinstance(alpha_grid, dict) else ({"*": list(alpha_grid)} if alpha_grid else {})
    for spec in specs:
        parse_spec(spec)
    check_output_folder(out, "compare", OWN_FILES, also_own=_is_spec)
    chosen: dict[str, float] = {}
    selection: dict[str, dict[str, float | None]] = {}
    for spec in specs:
        method, rifle = parse_spec(spec)
        grid = grids.get(method, grids.get("*", []))
        if not (get_method(method).uses("alpha") and grid) or method in chosen:  # a +rifle variant's grid runs on its base method
            continue
        if len(grid) == 1:  # nothing to choose between (e.g. an alpha found by `deltatl search`): no selection run
            chosen[method] = grid[0]
            continue
        scores = {}
        for alpha in grid:  # the choice needs them all: wait for those other processes train
            config = _run_config(base, out, method, seeds[0], alpha)
            scores[alpha] = when_free(lambda: train(config), poll_seconds)["val_top1"]
        if any(v is None for v in scores.values()):
            raise DeltatlError("choosing alpha needs a validation split (`val_per_class` > 0)")
        chosen[method] = max(grid, key=lambda a: scores[a])  # max() keeps the first of ties
        selection[method] = {f"{a:g}": s for a, s in scores.items()}

    def run_config(spec: str, seed: int) -> TrainConfig:
        method = parse_spec(spec)[0]
        alpha = chosen.get(method)
        # WiSE-FT interpolates an LP-FT run: the comparison's own, when it has one with the same alpha
        fine_tuning = fine_tuning_of(spec)
        reuse = get_method(method).weight_ensemble and fine_tuning in specs and chosen.get(
            parse_spec(fine_tuning)[0]) == alpha
        return replace(_run_config(base, out, spec, seed, alpha),
                       fine_tuned=_run_config(base, out, fine_tuning, seed, alpha).out if reuse else None)

    done = _share_runs([(spec, seed) for spec in specs for seed in seeds],
                       lambda spec, seed: train(run_config(spec, seed)), poll_seconds)
    rows = []
    for spec in specs:
        method, _ = parse_spec(spec)
        alpha = chosen.get(method)
        summaries = [done[spec, seed] for seed in seeds]
        val = [s["val_top1"] for s in summaries if s["val_top1"] is not None]
        test = [s["test_top1"] for s in summaries]
        row = {"method": spec, "alpha": alpha if alpha is not None else replace(base, method=method).resolved_alpha(),
               "runs": len(summaries), "test_mean": _mean_std(test)[0], "test_std": _mean_std(test)[1],
               "val_mean": _mean_std(val)[0] if val else None, "val_std": _mean_std(val)[1] if val else None,
               "seconds_mean": statistics.fmean(s["seconds"] for s in summaries),
               "tests": test}  # per seed, in the order of ``seeds``
        rows.append(row)
    paired = paired_differences({r["method"]: r["tests"] for r in rows})
    write_results(out, rows, selection, seeds, paired, results_tag(base, table))
    return rows


def results_tag(base: TrainConfig, table: str = "") -> str:
    """What the names of a comparison's table files end with: its ``table`` name, then DELTA's term
    settings when they are not the defaults (so both settings can share one folder and its baseline runs)."""
    default = TrainConfig()
    delta = settings_tag(replace(base, method="delta")) if (base.delta_source_bn, base.delta_reduction) != (
        default.delta_source_bn, default.delta_reduction) else ""
    return "-".join(t for t in (table, delta) if t)


def results_name(name: str, tag: str) -> str:
    """``results.md`` with ``tag`` -> ``results-<tag>.md``."""
    return name.replace(".", f"-{tag}.", 1) if tag else name


# The baselines every method is measured against (when they are in the comparison); see references().
BASELINES = ("l2", "l2-sp", "l2-fe")


def references(spec: str, specs: Collection[str]) -> list[str]:
    """What ``spec`` is measured against, of ``specs``: each baseline, and what it adds to: a +rifleK
    spec its method without RIFLE, a composition each of its parts (``delta+bss``: ``delta``, ``bss``),
    WiSE-FT the LP-FT run it interpolates (``wise-ft``: ``lp-ft``)."""
    method, rifle = parse_spec(spec)
    parts = method.split("+")
    adds_to = ([method] if rifle else []) + (parts if len(parts) > 1 else []) + (
        [fine_tuning_of(method)] if get_method(method).weight_ensemble else [])
    found = [b for b in BASELINES if b in specs and b != spec]
    for other in adds_to:
        if other in specs and other != spec and other not in found:
            found.append(other)
    return found


def _share_runs(keys: list[tuple[str, int]], run: Callable[[str, int], dict[str, Any]],
                poll_seconds: float) -> dict[tuple[str, int], dict[str, Any]]:
    """``run(*key)`` for every key, in order, skipping those another process trains now; then again
    over the skipped ones (their results are reused once finished), waiting only when none was free."""
    done: dict[tuple[str, int], dict[str, Any]] = {}
    pending = keys
    while pending:
        busy = []
        for key in pending:
            try:
                done[key] = run(*key)
            except RunInUse:
                busy.append(key)
        if busy and len(busy) == len(pending):  # nothing was free: the others are still training
            time.sleep(poll_seconds)
        pending = busy
    return done


def paired_differences(tests: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Test top-1 of each spec minus that of each of its :func:`references`, paired by seed (same images),
    as :func:`paired_difference` computes it."""
    return [{"method": spec, "minus": reference, **paired_difference(values, tests[reference])}
            for spec, values in tests.items() for reference in references(spec, tests)]


def paired_difference(values: Sequence[float], others: Sequence[float]) -> dict[str, Any]:
    r"""``values`` minus ``others``, paired by position (seed).

    For the n per-seed differences :math:`d_i`: their mean, sample std and the 95 % confidence
    interval of the mean, :math:`\bar d \pm t_{0.975,\,n-1}\, s_d / \sqrt{n}` (Student's t).
    """
    from scipy.stats import t as student

    diffs = [a - b for a, b in zip(values, others, strict=True)]
    n = len(diffs)
    mean, std = _mean_std(diffs)
    half = student.ppf(0.975, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {"runs": n, "diff_mean": mean, "diff_std": std, "ci_low": mean - half, "ci_high": mean + half}


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| method | alpha | test top-1 (%) | val top-1 (%) | runs | s / run |", "|---|---|---|---|---|---|"]
    for r in rows:
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:g}"
        val = "-" if r["val_mean"] is None else f"{r['val_mean']:.2f} ± {r['val_std']:.2f}"
        lines.append(f"| {r['method']} | {alpha} | {r['test_mean']:.2f} ± {r['test_std']:.2f} | {val} | "
                     f"{r['runs']} | {r['seconds_mean']:.0f} |")
    return "\n".join(lines)


def paired_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| method | minus | runs | mean difference (points) | std | 95 % interval |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['minus']} | {r['runs']} | {r['diff_mean']:+.2f} | {r['diff_std']:.2f} | "
                     f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] |")
    return "\n".join(lines)


def write_results(out: str, rows: Sequence[dict[str, Any]], selection: dict[str, Any], seeds: Sequence[int],
                  paired: Sequence[dict[str, Any]] = (), tag: str = "") -> None:
    """``results.md`` / ``.csv``, ``paired.csv``, ``alpha_selection.json`` in ``out``, their names ending
    in ``-<tag>`` when there is one (:func:`results_tag`)."""
    os.makedirs(out, exist_ok=True)

    def write(name: str, write_to: Callable[[Any], None], newline: str | None = None) -> None:
        path = os.path.join(out, results_name(name, tag))
        with atomic_open(path, "w", newline=newline) as f:
            write_to(f)

    text = markdown_table(rows) + f"\n\nmean ± std over seeds {', '.join(map(str, seeds))}\n"
    if paired:
        text += ("\nPaired by seed (same training, validation and test images), test top-1 of the method minus "
                 "the other:\n\n" + paired_table(paired) + "\n")
    write("results.md", lambda f: f.write(text))
    write("results.csv", lambda f: _write_csv(f, rows), newline="")
    if paired:
        write("paired.csv", lambda f: _write_csv(f, paired), newline="")
    write("alpha_selection.json",
          lambda f: json.dump({"rule": "highest val top-1 of the first seed", "val_top1": selection}, f, indent=2))


def _write_csv(f: Any, rows: Sequence[dict[str, Any]]) -> None:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
