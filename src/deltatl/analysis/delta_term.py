"""DELTA's term along training, and the part of it that BatchNorm statistics alone make.

For every run with DELTA's term, per epoch: the weighted term averaged over the epoch's steps
(``train/reg/delta``) and, on the epoch's first batch, the weighted distance between the source
network's feature maps under the batch's BatchNorm statistics and under its running statistics
(``delta/bn_gap``, see :meth:`deltatl.engine.objective.Objective.statistics_gap`). With the authors'
setting (``--delta-source-bn running``) the second is what the term measures at step 0 although no
weight has moved; with ``batch`` it is left out of the term and shown for comparison.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from .plotting import AnalysisResult, Table, fmt, new_figure, plain_log_axis, run_styles, save_figure, write_csv
from .runs import Run

NAME = "delta_term"
KEYS = ("train/reg/delta", "delta/bn_gap", "train/ce")


def delta_runs(runs: Sequence[Run]) -> list[Run]:
    """The runs whose metrics hold DELTA's term."""
    return [r for r in runs if any("train/reg/delta" in row for row in r.eval_rows)]


def delta_term_analysis(runs: Sequence[Run], out_dir: str) -> AnalysisResult:
    """Write ``delta_term.{png,svg,csv}`` (term, statistics part and cross-entropy per epoch)."""
    runs = delta_runs(runs)
    rows = [{"run": run.label, "source_bn": run.config.get("delta_source_bn", "running"), "epoch": row["epoch"],
             "step": row["step"], **{k: row.get(k) for k in KEYS}} for run in runs for row in run.eval_rows]
    data = write_csv(os.path.join(out_dir, f"{NAME}.csv"), rows)
    styles = run_styles([r.label for r in runs], [r.spec for r in runs])
    fig = new_figure(8.0, 4.5)
    ax = fig.subplots()
    for run in runs:
        style = styles[run.label]
        for key, width, alpha, label in (("train/reg/delta", 1.6, 1.0, "term"),
                                         ("delta/bn_gap", 0.9, 0.7, "statistics alone")):
            points = [(r["step"], r[key]) for r in run.eval_rows if r.get(key)]
            if points:
                ax.plot(*zip(*points), color=style["color"], linestyle="-" if key == KEYS[0] else "--",
                        linewidth=width, alpha=alpha, label=f"{run.label} ({run.config.get('delta_source_bn', 'running')}): {label}")
    ax.set_yscale("log")
    plain_log_axis(ax.yaxis)
    ax.set_xlabel("iteration (optimisation step)")
    ax.set_ylabel("weighted term (alpha included)")
    ax.set_title("DELTA's term, and what BatchNorm statistics alone make of it")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    figure = save_figure(fig, out_dir, NAME)
    table = Table("DELTA's term (weighted) and its statistics part, first and last epoch",
                  ["run", "source BN", "term, epoch 1", "statistics, epoch 1", "term, last", "statistics, last",
                   "CE, last"], [])
    for run in runs:
        first, last = run.eval_rows[0], run.eval_rows[-1]
        table.rows.append([run.label, run.config.get("delta_source_bn", "running"),
                           *(fmt(row.get(key), 4) for row in (first, last) for key in KEYS[:2]),
                           fmt(last.get("train/ce"), 4)])
    return AnalysisResult(NAME, "DELTA's term and BatchNorm statistics",
                          "Per epoch, DELTA's weighted term (solid) and the part of it that the difference "
                          "between the source's batch and running BatchNorm statistics alone makes (dashed). "
                          "With the source on running statistics (the authors'), that part is in the term "
                          "from step 0 on, although no weight has moved.",
                          figures=[figure], data_files=[data], tables=[table])
