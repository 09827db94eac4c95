"""Learning curves (DELTA paper, Figure 2): validation accuracy and training loss against iterations,
several runs on one plot, with the learning-rate schedule drawn underneath.

The numbers are the runs' own ``metrics.jsonl`` rows, unchanged: :func:`curve_rows` flattens them into
one table with a ``run`` column (written as ``learning_curves.csv``). Event rows (RIFLE
re-initialisations) are kept in the table and drawn as vertical dotted lines.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure

from .plotting import AnalysisResult, Table, fmt, new_figure, plain_log_axis, run_styles, save_figure, write_csv
from .runs import Run

NAME = "learning_curves"


def curve_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Every ``metrics.jsonl`` row of every run, in file order, with the run's label under ``run``."""
    return [{"run": run.label, **row} for run in runs for row in run.metrics]


def curve_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """``run``, then the metric keys in order of first appearance."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def _series(run: Run, key: str) -> tuple[list[int], list[float]]:
    rows = [r for r in run.eval_rows if r.get(key) is not None]
    return [int(r["step"]) for r in rows], [float(r[key]) for r in rows]


def plot_learning_curves(runs: Sequence[Run]) -> Figure:
    """Three panels sharing the step axis: validation top-1, training loss (log scale; the full
    objective, regularizer included), and the learning rate (log scale)."""
    styles = run_styles([r.label for r in runs], [r.spec for r in runs])
    fig = new_figure(8.0, 7.0)
    acc, loss, lr = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2.2, 1]})
    for run in runs:
        style = styles[run.label]
        steps, values = _series(run, "val/top1")
        acc.plot(steps, values, marker="o", markersize=3, label=run.label, **style)
        steps, values = _series(run, "train/loss")
        loss.plot(steps, values, **style)
        steps, values = _series(run, "train/ce")
        if values and any(r.get("train/loss") != r.get("train/ce") for r in run.eval_rows):
            # The cross-entropy alone, thin: for regularized methods the loss includes the penalty.
            loss.plot(steps, values, color=style["color"], linestyle=style["linestyle"], linewidth=0.8,
                      alpha=0.6)
        steps, values = _series(run, "lr")
        lr.step(steps, values, where="pre", **style)
        for step in run.rifle_steps:
            for ax in (acc, loss, lr):
                ax.axvline(step, color=style["color"], linestyle=":", linewidth=0.9, alpha=0.8)
    acc.set_ylabel("validation top-1 (%)")
    acc.set_title("Learning curves")
    acc.legend(fontsize=8, loc="lower right")
    loss.set_ylabel("training loss")
    loss.set_yscale("log")
    plain_log_axis(loss.yaxis)
    if any(r.rifle_steps for r in runs):
        loss.text(0.99, 0.95, "dotted vertical lines: RIFLE re-initialisations", transform=loss.transAxes,
                  ha="right", va="top", fontsize=7, color="#555555")
    if any(any(r.get("train/loss") != r.get("train/ce") for r in run.eval_rows) for run in runs):
        loss.text(0.01, 0.04, "thick: full objective; thin: cross-entropy alone", transform=loss.transAxes,
                  fontsize=7, color="#555555")
    lr.set_ylabel("learning rate")
    lr.set_yscale("log")
    plain_log_axis(lr.yaxis)
    lr.set_xlabel("iteration (optimisation step)")
    for ax in (acc, loss, lr):
        ax.grid(True, alpha=0.3)
    return fig


def learning_curves(runs: Sequence[Run], out_dir: str) -> AnalysisResult:
    """Write ``learning_curves.{png,svg,csv}`` and return the result for the report."""
    rows = curve_rows(runs)
    data = write_csv(os.path.join(out_dir, f"{NAME}.csv"), rows, curve_columns(rows))
    figure = save_figure(plot_learning_curves(runs), out_dir, NAME)
    table = Table("Validation top-1 along training (%)",
                  ["run", "first epoch", "best", "best at step", "last"],
                  [])
    for run in runs:
        steps, values = _series(run, "val/top1")
        if not values:
            continue
        best = max(range(len(values)), key=values.__getitem__)
        table.rows.append([run.label, fmt(values[0]), fmt(values[best]), str(steps[best]), fmt(values[-1])])
    return AnalysisResult(NAME, "Learning curves",
                          "Validation top-1 and training loss against iterations (the paper's Figure 2), "
                          "with the learning-rate schedule underneath.",
                          figures=[figure], data_files=[data], tables=[table])
