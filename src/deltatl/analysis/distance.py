r"""Distance from the starting point (DELTA paper, section 4.4 and Figure 3).

For every convolution filter :math:`j` of every ``nn.Conv2d`` layer :math:`l` (weight of shape
``(out, in / groups, kh, kw)``; filter :math:`j` is ``weight[j]`` flattened to a vector of
``in / groups * kh * kw`` numbers), the Euclidean distance between the fine-tuned and the starting
value

.. math:: d_{l,j} = \lVert W_l[j] - W^*_l[j] \rVert_2 .

The filters are grouped into the backbone's stages and each stage's distances are sorted in decreasing
order, one curve per run: the paper found L2-SP keeping almost every filter near its start while DELTA
moves most filters further and a few very far ("unactivated channel re-usage").

Stages: the paper used ResNet's conv2_x..conv5_x. Here a stage is cut at each layer DELTA taps
(:func:`deltatl.features.layer_preset`, the last convolution of each stage): stage :math:`k` holds the
convolutions run after tap :math:`k-1` up to tap :math:`k`; the stem joins the first stage and any
convolution after the last tap (EfficientNet's 1x1 ``conv_head``) the last.

The starting point is rebuilt from the run's settings (:func:`deltatl.analysis.runs.start_model`), so it
is exactly the network the run started from.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

from ..errors import DeltatlError
from ..modes import evaluating
from .plotting import (AnalysisResult, Table, fmt, new_figure, plain_log_axis, run_styles, save_figure, write_csv,
                       write_json)
from .runs import Run, comparable_groups, map_layers, num_classes, start_model, trained_model

NAME = "distance"
#: Points drawn (and written) per curve: the curves are monotone, so evenly spaced ranks keep their
#: shape; the first ranks (the far-moved filters of the left end) are always kept.
CURVE_POINTS = 200
KEEP_FIRST = 25


@dataclass
class Stage:
    """A group of convolutions: ``name`` for display, ``layers`` (module names) in forward order."""

    name: str
    layers: list[str]


def filter_distances(start: nn.Module, end: nn.Module, layers: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    r"""Per ``nn.Conv2d`` layer, the distance of every output filter from its start:
    :math:`d_j = \lVert W[j] - W^*[j] \rVert_2` (float64, computed in float64).

    Args:
        start, end: two networks of the same architecture.
        layers: the convolution module names to compare (default: every ``nn.Conv2d`` of ``end``).

    Raises:
        DeltatlError: a layer is missing from either network or has another shape.
    """
    start_modules, end_modules = dict(start.named_modules()), dict(end.named_modules())
    if layers is None:
        layers = [n for n, m in end_modules.items() if isinstance(m, nn.Conv2d)]
    out = {}
    for name in layers:
        a, b = start_modules.get(name), end_modules.get(name)
        if not isinstance(a, nn.Conv2d) or not isinstance(b, nn.Conv2d) or a.weight.shape != b.weight.shape:
            raise DeltatlError(f"convolution {name!r} differs between the start and the fine-tuned network")
        diff = b.weight.detach().double().cpu() - a.weight.detach().double().cpu()
        out[name] = diff.flatten(1).norm(dim=1).numpy()
    return out


def conv_order(model: nn.Module, image_size: int) -> list[str]:
    """Names of the ``nn.Conv2d`` modules in the order a forward pass runs them (first run counts)."""
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(
                lambda _m, _a, _o, name=name: order.append(name) if name not in order else None))
    try:
        param = next(model.parameters())
        with evaluating(model), torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, dtype=param.dtype, device=param.device))
    finally:
        for handle in handles:
            handle.remove()
    # Convolutions that did not run (e.g. an auxiliary head in eval mode) are not part of any stage.
    return order


def _unit(name: str, depth: int) -> str:
    return ".".join(name.split(".")[:depth])


def _unit_depth(model: nn.Module, order: Sequence[str]) -> int:
    """How many name components name a stage: those of timm's ``feature_info`` modules (``layer2``: 1,
    ``blocks.3``: 2); otherwise the smallest depth that tells the convolutions apart."""
    info = getattr(model, "feature_info", None)
    entries = info.get_dicts() if hasattr(info, "get_dicts") else info
    if isinstance(entries, list) and entries and all(isinstance(e, dict) and "module" in e for e in entries):
        return max(len(str(e["module"]).split(".")) for e in entries)
    for depth in range(1, 4):
        if len({_unit(n, depth) for n in order}) > 1:
            return depth
    return 1


def backbone_stages(model: nn.Module, taps: Sequence[str], image_size: int) -> list[Stage]:
    """Cut the convolutions (in forward order) into one stage per tapped layer (see the module doc).

    Each stage is named after the first and last "units" it spans (``layer2``; ``blocks.3–blocks.4``).
    """
    order = conv_order(model, image_size)
    positions = []
    for tap in taps:
        # A tap may be a module after its convolution (e.g. an in-place ReLU): cut after the last
        # convolution run before or inside it.
        inside = [i for i, n in enumerate(order) if n == tap or n.startswith(tap + ".")]
        if inside:
            positions.append(inside[-1])
        else:
            prefix = tap.rsplit(".", 1)[0]
            related = [i for i, n in enumerate(order) if n.startswith(prefix + ".")]
            if not related:
                raise DeltatlError(f"tapped layer {tap!r} is not after any convolution")
            positions.append(related[-1])
    positions = sorted(set(positions))
    bounds = [-1, *positions[:-1], len(order) - 1]
    depth = _unit_depth(model, order)
    stages = []
    for k, (lo, hi) in enumerate(zip(bounds, bounds[1:]), 1):
        layers = order[lo + 1:hi + 1]
        if not layers:
            continue
        first, last = _unit(layers[0], depth), _unit(layers[-1], depth)
        span = first if first == last else f"{first}–{last}"
        stages.append(Stage(f"stage {k}: {span}", layers))
    return stages


def stage_distances(distances: Mapping[str, np.ndarray], stages: Sequence[Stage]) -> dict[str, np.ndarray]:
    """Each stage's filter distances, concatenated in layer order (NOT sorted: filter ``i`` of a stage is
    the same filter in every run of the same architecture, which :func:`share_farther` relies on)."""
    return {s.name: np.concatenate([distances[layer] for layer in s.layers]) for s in stages}


def share_farther(values: np.ndarray, reference: np.ndarray) -> float:
    """Share of filters (in [0, 1]) that moved further from their start than the same filter did in the
    reference run (the paper: "about 90% of DELTA's filters have a larger distance than L2-SP's")."""
    if values.shape != reference.shape:
        raise ValueError("the runs' filters differ")
    return float(np.mean(values > reference)) if values.size else float("nan")


def sorted_curve(values: np.ndarray, points: int = CURVE_POINTS, keep_first: int = KEEP_FIRST) -> tuple[np.ndarray, np.ndarray]:
    """``(ranks, distances)``: the distances sorted in decreasing order, at most about ``points`` ranks
    evenly spaced plus the first ``keep_first``."""
    ordered = np.sort(values)[::-1]
    n = len(ordered)
    ranks = np.unique(np.concatenate([np.arange(min(keep_first, n)),
                                      np.linspace(0, n - 1, min(points, n)).round().astype(int)]))
    return ranks, ordered[ranks]


def summarize(values: np.ndarray) -> dict[str, float]:
    """Count, mean and quantiles of one stage's distances."""
    if values.size == 0:
        return {"filters": 0}
    q = np.quantile(values, [0.1, 0.5, 0.9])
    return {"filters": int(values.size), "mean": float(values.mean()), "p10": float(q[0]),
            "median": float(q[1]), "p90": float(q[2]), "max": float(values.max()),
            "zero": float(np.mean(values == 0))}


def plot_distances(curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]], stages: Sequence[str],
                   styles: Mapping[str, Mapping[str, Any]], log: bool) -> Figure:
    """One panel per stage; in each, one decreasing curve per run. ``curves[run][stage] = (ranks, d)``."""
    cols = min(len(stages), 4)
    rows = (len(stages) + cols - 1) // cols
    fig = new_figure(3.1 * cols + 0.4, 2.9 * rows + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, stage in zip(axes, stages):
        for label, per_stage in curves.items():
            ranks, values = per_stage[stage]
            if log:
                keep = values > 0  # a filter that never moved has no place on a log axis
                ranks, values = ranks[keep], values[keep]
            ax.plot(ranks, values, label=label, linewidth=1.4, **styles[label])
        ax.set_title(stage, fontsize=9)
        ax.set_xlabel("filter (sorted by distance)", fontsize=8)
        if log:
            ax.set_yscale("log")
            plain_log_axis(ax.yaxis)
            drawn = np.concatenate([per_stage[stage][1] for per_stage in curves.values()])
            drawn = drawn[drawn > 0]
            if drawn.size:
                # The few filters that barely moved (down to 1e-12) would stretch the axis over many
                # decades and flatten the curves; they leave the panel at its bottom instead.
                ax.set_ylim(max(float(drawn.min()), 0.5 * float(np.quantile(drawn, 0.01))), 1.4 * float(drawn.max()))
        ax.grid(True, alpha=0.3)
        ax.tick_params(which="both", labelsize=7)
    for ax in axes[len(stages):]:
        ax.set_visible(False)
    axes[0].set_ylabel("‖W[j] − W*[j]‖₂")
    axes[0].legend(fontsize=7)
    fig.suptitle("Distance of every convolution filter from its starting point")
    return fig


def reference_run(runs: Sequence[Run]) -> Run | None:
    """The run the others are compared with filter by filter: the first L2-SP run, as in the paper."""
    return next((r for r in runs if r.spec == "l2-sp"), None)


def distance_analysis(runs: Sequence[Run], out_dir: str, *, progress: bool = True,
                      load_trained: Callable[[Run], tuple[nn.Module, dict[str, Any]]] = trained_model) -> AnalysisResult:
    """Write ``distance.{png,svg}``, ``distance_curves.csv`` (the drawn points) and
    ``distance_summary.json`` (per run and stage: count, mean, quantiles, and the share of filters
    farther than in the L2-SP run)."""
    notes = []
    group = comparable_groups(runs, ("model",))[0]
    if len(group) < len(runs):
        notes.append("left out (another architecture): " + ", ".join(r.label for r in runs if r not in group))
    per_run: dict[str, dict[str, np.ndarray]] = {}
    stages: list[Stage] = []
    for run in tqdm(group, desc="distance", unit="run", leave=False, disable=None if progress else True):
        model, info = load_trained(run)
        start = start_model(run, num_classes(run, info))
        if not stages:
            stages = backbone_stages(start, map_layers(start, run), int(run.config.get("image_size", 224)))
        layers = [layer for s in stages for layer in s.layers]
        per_run[run.label] = stage_distances(filter_distances(start, model, layers), stages)
    names = [s.name for s in stages]
    reference = reference_run(group)
    summary: dict[str, Any] = {"stages": {s.name: s.layers for s in stages},
                               "reference": reference.label if reference else None, "runs": {}}
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    rows = []
    for label, by_stage in per_run.items():
        summary["runs"][label] = {}
        curves[label] = {}
        for name, values in by_stage.items():
            stats = summarize(values)
            if reference is not None and label != reference.label:
                stats["share_farther_than_reference"] = share_farther(values, per_run[reference.label][name])
            summary["runs"][label][name] = stats
            ranks, sorted_values = sorted_curve(values)
            curves[label][name] = (ranks, sorted_values)
            rows += [{"run": label, "stage": name, "rank": int(r), "distance": float(f"{d:.6g}")}
                     for r, d in zip(ranks, sorted_values)]
    # A log axis: a few filters move far and the bulk barely moves, and the methods differ by factors;
    # on a linear axis the left end would flatten everything else. (Filters that did not move at all,
    # e.g. an L2-FE backbone, have no place on it: counted in the summary's "zero" share.)
    log = any(np.any(v > 0) for s in per_run.values() for v in s.values())
    styles = run_styles(list(per_run), [r.spec for r in group])
    figure = save_figure(plot_distances(curves, names, styles, log), out_dir, NAME)
    files = [write_csv(os.path.join(out_dir, f"{NAME}_curves.csv"), rows, ["run", "stage", "rank", "distance"]),
             write_json(os.path.join(out_dir, f"{NAME}_summary.json"), summary)]
    tables = [Table("Median distance from the start per stage", ["run", *names],
                    [[label, *(fmt(summary["runs"][label][n].get("median"), 4) for n in names)] for label in per_run])]
    if reference is not None:
        tables.append(Table(f"Share of filters that moved further than in {reference.label} (%)", ["run", *names],
                            [[label, *(fmt(100 * summary["runs"][label][n]["share_farther_than_reference"], 1)
                                       for n in names)] for label in per_run if label != reference.label]))
    return AnalysisResult(NAME, "Distance from the starting point",
                          "For each stage of the backbone, the Euclidean distance of every flattened convolution "
                          "filter from its pretrained value, sorted in decreasing order (the paper's Figure 3)"
                          + (" — log scale." if log else "."),
                          figures=[figure], data_files=files, tables=tables, notes=notes)
