"""RIFLE: validation accuracy and the head's weight norm around each re-initialisation of the head.

``metrics.jsonl`` of a RIFLE run has an event row ``{"step": s, "event": "rifle"}`` for each
re-initialisation, written right after it. Re-initialisations fall on epoch ends, and the training loop
re-initialises *before* that epoch's evaluation, so the evaluation row at step ``s`` measures the new,
random head: "before" is the evaluation before ``s``, "at" the one at ``s`` (just re-initialised),
"after" the next one (one epoch of training later). ``head/norm`` (the Frobenius norm of the head's
weight) is logged in every evaluation row; runs written before that log existed have the accuracy only.
A row's ``train/ce`` is the mean over that epoch's steps, all taken before the re-initialisation that
ends it: "at" is the last epoch of the old head.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure

from ..errors import DeltatlError
from .plotting import AnalysisResult, Table, fmt, new_figure, run_styles, save_figure, write_csv
from .runs import Run

NAME = "rifle"
KEYS = ("val/top1", "head/norm", "train/ce")


def around_events(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each re-initialisation logged in ``rows`` (a run's metrics), the evaluation rows before, at and
    after it: ``{"event", "step", "before_step", "after_step", "<key>_before", "<key>_at", "<key>_after"}``
    for the keys ``val/top1``, ``head/norm`` and ``train/ce`` (None where not logged)."""
    evals = [r for r in rows if "event" not in r]
    events = [int(r["step"]) for r in rows if r.get("event") == "rifle"]
    out = []
    for k, step in enumerate(events, 1):
        before = [r for r in evals if r["step"] < step]
        at = [r for r in evals if r["step"] == step]
        after = [r for r in evals if r["step"] > step]
        item: dict[str, Any] = {"event": k, "step": step,
                                "before_step": before[-1]["step"] if before else None,
                                "after_step": after[0]["step"] if after else None}
        for key in KEYS:
            item[f"{key}_before"] = before[-1].get(key) if before else None
            item[f"{key}_at"] = at[0].get(key) if at else None
            item[f"{key}_after"] = after[0].get(key) if after else None
        out.append(item)
    return out


def plot_rifle(rifle_runs: Sequence[Run], others: Sequence[Run]) -> Figure:
    """Validation top-1 (top) and head-weight norm (bottom) against steps; RIFLE runs in colour with
    their re-initialisations as dotted lines, runs of the same base method without RIFLE for reference."""
    runs = [*rifle_runs, *others]
    styles = run_styles([r.label for r in runs], [r.spec for r in runs])
    with_norm = any(r.get("head/norm") is not None for run in runs for r in run.eval_rows)
    fig = new_figure(8.0, 5.8 if with_norm else 3.6)
    axes = fig.subplots(2 if with_norm else 1, 1, sharex=True, squeeze=False)[:, 0]
    for run in runs:
        style = dict(styles[run.label])
        if run in others:
            style.update(alpha=0.6, linewidth=1.0)
        for ax, key in zip(axes, ("val/top1", "head/norm")):
            rows = [r for r in run.eval_rows if r.get(key) is not None]
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", markersize=3,
                    label=run.label, **style)
        for step in run.rifle_steps:
            for ax in axes:
                ax.axvline(step, color=styles[run.label]["color"], linestyle=":", linewidth=1.0)
    axes[0].set_ylabel("validation top-1 (%)")
    axes[0].legend(fontsize=8)
    axes[0].set_title("RIFLE: around each re-initialisation of the head (dotted lines)")
    if with_norm:
        axes[1].set_ylabel("‖head weight‖")
    axes[-1].set_xlabel("iteration (the evaluation at a dotted line sees the new, random head)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig


def rifle_analysis(runs: Sequence[Run], out_dir: str) -> AnalysisResult:
    """Write ``rifle.{png,svg,csv}`` for the runs with RIFLE events.

    Raises:
        DeltatlError: no run re-initialised its head.
    """
    rifle_runs = [r for r in runs if r.rifle_steps]
    if not rifle_runs:
        raise DeltatlError("no run re-initialised its head (RIFLE)")
    bases = {r.method for r in rifle_runs}
    others = [r for r in runs if not r.rifle and r.method in bases]
    rows = [{"run": run.label, **item} for run in rifle_runs for item in around_events(run.metrics)]
    columns = ["run", "event", "step", "before_step", "after_step",
               *[f"{k}_{w}" for k in KEYS for w in ("before", "at", "after")]]
    files = [write_csv(os.path.join(out_dir, f"{NAME}.csv"), rows, columns)]
    figure = save_figure(plot_rifle(rifle_runs, others), out_dir, NAME)
    table = Table("Validation top-1 (%) and head-weight norm around each re-initialisation",
                  ["run", "event", "step", "top-1 before", "top-1 at (new head)", "top-1 after",
                   "norm before", "norm at", "norm after"],
                  [[r["run"], str(r["event"]), str(r["step"]), fmt(r["val/top1_before"]), fmt(r["val/top1_at"]),
                    fmt(r["val/top1_after"]), fmt(r["head/norm_before"]), fmt(r["head/norm_at"]),
                    fmt(r["head/norm_after"])] for r in rows])
    notes = []
    if not any(r.get("head/norm") is not None for run in rifle_runs for r in run.eval_rows):
        notes.append("these runs predate the head/norm log: only the accuracy is shown")
    return AnalysisResult(NAME, "RIFLE re-initialisations",
                          "Validation accuracy and the head's weight norm around each re-initialisation of the "
                          "final linear layer.", figures=[figure], data_files=files, tables=[table], notes=notes)
