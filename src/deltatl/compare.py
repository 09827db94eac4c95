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
import os
import re
import statistics
from dataclasses import replace
from typing import Any, Callable, Sequence

from .config import TrainConfig
from .engine.objective import get_method
from .errors import DeltatlError

_SPEC = re.compile(r"^(?P<method>[a-z0-9-]+)(\+rifle(?P<rifle>\d+))?$")


def parse_spec(spec: str) -> tuple[str, int]:
    match = _SPEC.match(spec)
    if not match:
        raise DeltatlError(f"bad method spec '{spec}' (expected e.g. delta, l2-sp or delta+rifle3)")
    get_method(match["method"])
    return match["method"], int(match["rifle"] or 0)


def _run_config(base: TrainConfig, out: str, spec: str, seed: int, alpha: float | None) -> TrainConfig:
    method, rifle = parse_spec(spec)
    alpha_part = "" if alpha is None else f"alpha{alpha:g}"
    folder = os.path.join(out, spec, alpha_part, f"seed{seed}") if alpha_part else os.path.join(out, spec, f"seed{seed}")
    return replace(base, method=method, rifle=rifle, seed=seed, out=folder,
                   alpha=base.alpha if alpha is None else alpha)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def parse_alpha_grid(items: Sequence[str]) -> dict[str, list[float]]:
    """``["0.01", "0.1"]`` (every method) or ``["delta=1e-4,1e-3", "l2-sp=0.01"]`` -> method -> grid.

    The key ``"*"`` holds the grid of methods not named.
    """
    grids: dict[str, list[float]] = {}
    for item in items:
        method, _, values = item.rpartition("=")
        try:
            numbers = [float(v) for v in values.split(",") if v]
        except ValueError:
            raise DeltatlError(f"bad --alpha-grid item '{item}' (e.g. 0.01 or delta=1e-4,1e-3)") from None
        if method:
            get_method(method)
        grids.setdefault(method or "*", []).extend(numbers)
    return grids


def compare(base: TrainConfig, specs: Sequence[str], seeds: Sequence[int], out: str,
            alpha_grid: dict[str, Sequence[float]] | Sequence[float] = (), *,
            train: Callable[[TrainConfig], dict[str, Any]]) -> list[dict[str, Any]]:
    """Run (or reuse) every (method, seed) and return one aggregated row per method spec.

    Args:
        alpha_grid: candidate alphas, for every method or per method (see :func:`parse_alpha_grid`).
        train: runs one config and returns its summary (``deltatl.run.train_run`` with options bound).
    """
    grids = dict(alpha_grid) if isinstance(alpha_grid, dict) else ({"*": list(alpha_grid)} if alpha_grid else {})
    for spec in specs:
        parse_spec(spec)
    chosen: dict[str, float] = {}
    selection: dict[str, dict[str, float | None]] = {}
    for spec in specs:
        method, rifle = parse_spec(spec)
        uses_alpha = get_method(method).starting_point or get_method(method).feature_maps
        grid = grids.get(method, grids.get("*", []))
        if not (uses_alpha and grid) or method in chosen:  # a +rifle variant's grid runs on its base method
            continue
        scores = {}
        for alpha in grid:
            scores[alpha] = train(_run_config(base, out, method, seeds[0], alpha))["val_top1"]
        if any(v is None for v in scores.values()):
            raise DeltatlError("choosing alpha needs a validation split (--val-per-class > 0)")
        chosen[method] = max(grid, key=lambda a: scores[a])  # max() keeps the first of ties
        selection[method] = {f"{a:g}": s for a, s in scores.items()}
    rows = []
    for spec in specs:
        method, _ = parse_spec(spec)
        alpha = chosen.get(method)
        summaries = [train(_run_config(base, out, spec, seed, alpha)) for seed in seeds]
        val = [s["val_top1"] for s in summaries if s["val_top1"] is not None]
        test = [s["test_top1"] for s in summaries]
        row = {"method": spec, "alpha": alpha if alpha is not None else (
            base.alpha if get_method(method).starting_point or get_method(method).feature_maps else None),
               "runs": len(summaries), "test_mean": _mean_std(test)[0], "test_std": _mean_std(test)[1],
               "val_mean": _mean_std(val)[0] if val else None, "val_std": _mean_std(val)[1] if val else None,
               "seconds_mean": statistics.fmean(s["seconds"] for s in summaries)}
        rows.append(row)
    write_results(out, rows, selection, seeds)
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| method | alpha | test top-1 (%) | val top-1 (%) | runs | s / run |", "|---|---|---|---|---|---|"]
    for r in rows:
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:g}"
        val = "-" if r["val_mean"] is None else f"{r['val_mean']:.2f} ± {r['val_std']:.2f}"
        lines.append(f"| {r['method']} | {alpha} | {r['test_mean']:.2f} ± {r['test_std']:.2f} | {val} | "
                     f"{r['runs']} | {r['seconds_mean']:.0f} |")
    return "\n".join(lines)


def write_results(out: str, rows: Sequence[dict[str, Any]], selection: dict[str, Any], seeds: Sequence[int]) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown_table(rows) + f"\n\nmean ± std over seeds {', '.join(map(str, seeds))}\n")
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "alpha_selection.json"), "w") as f:
        json.dump({"rule": "highest val top-1 of the first seed", "val_top1": selection}, f, indent=2)
