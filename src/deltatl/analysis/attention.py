r"""DELTA's channel attention: how the weights are distributed in each layer and which channels they favour.

A DELTA run keeps its raw channel scores (loss increase when the channel is zeroed) in
``attention.json``; the weights it trained with are :func:`deltatl.attention.normalize_scores` of them
with the run's temperature, :math:`w_l = \mathrm{softmax}(z_l / T)`. The figures show :math:`C_l w_{l,j}`
(1 = the uniform weight of DELTA w/o ATT, so > 1 means a channel's feature map is held closer to the
source than without attention):

- top row: each layer's :math:`C_l w` sorted in decreasing order, one curve per DELTA run;
- bottom row (when the source network's activations on sample images are given): :math:`C_l w_j`
  against channel :math:`j`'s mean absolute activation in the source, with Spearman's rank
  correlation: does attention favour the channels that are strongly active anyway?

Statistics per layer: the largest and smallest :math:`C_l w`, the effective share of channels
:math:`e^{H(w)} / C_l` (1 for uniform weights; :math:`H` the entropy), the share of the total weight held
by the top 10% of channels, and the favoured channels.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy.stats import ConstantInputWarning, spearmanr
from torch import Tensor

from ..attention import normalize_scores, read_scores
from ..config import TrainConfig
from ..errors import DeltatlError
from .plotting import AnalysisResult, Table, fmt, new_figure, plain_log_axis, run_styles, save_figure, write_json
from .runs import Run

NAME = "attention"
TOP = 5


def run_weights(run: Run) -> dict[str, Tensor]:
    """The channel weights a DELTA run trained with (layer -> (C,), each summing to 1)."""
    if run.attention_path is None:
        raise DeltatlError(f"{run.path} has no attention.json")
    try:
        raw = read_scores(run.attention_path)
    except (OSError, ValueError) as exc:
        raise DeltatlError(str(exc)) from None
    temperature = float(run.config.get("attention_temperature", TrainConfig.attention_temperature))
    return normalize_scores(raw, temperature)


def weight_stats(weights: Tensor, top: int = TOP) -> dict[str, Any]:
    r"""Statistics of one layer's weights :math:`w` (summing to 1) over :math:`C` channels."""
    w = weights.double()
    c = w.numel()
    entropy = float(-(w * torch.log(w.clamp_min(1e-300))).sum())
    k = max(1, math.ceil(0.1 * c))
    order = torch.argsort(w, descending=True)
    return {"channels": c, "max_cw": float(w.max() * c), "min_cw": float(w.min() * c),
            "effective_share": math.exp(entropy) / c, "top10pct_share": float(w[order[:k]].sum()),
            "favoured": [int(i) for i in order[:top]], "favoured_cw": [float(w[i] * c) for i in order[:top]]}


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation (NaN if either side is constant)."""
    with warnings.catch_warnings():  # a constant side is a NaN here, not a warning
        warnings.simplefilter("ignore", ConstantInputWarning)
        return float(spearmanr(a, b).statistic)


def plot_attention(weights: Mapping[str, Mapping[str, Tensor]], styles: Mapping[str, Mapping[str, Any]],
                   source_strength: Mapping[str, Tensor] | None) -> Figure:
    """``weights[run][layer]``; see the module doc for the panels."""
    layers = list(next(iter(weights.values())))
    rows = 2 if source_strength else 1
    fig = new_figure(3.0 * len(layers) + 0.4, 2.8 * rows + 0.6)
    axes = fig.subplots(rows, len(layers), squeeze=False)
    first = next(iter(weights))
    # Runs that share their weights (same data, model and seed: one cached attention) are one curve,
    # named after all of them, rather than curves hidden under each other.
    groups: list[list[str]] = []
    for label, per_layer in weights.items():
        for group in groups:
            if all(torch.equal(per_layer[l], weights[group[0]][l]) for l in layers):
                group.append(label)
                break
        else:
            groups.append([label])
    for col, layer in enumerate(layers):
        ax = axes[0, col]
        for group in groups:
            w = weights[group[0]][layer].double()
            cw = np.sort((w * w.numel()).numpy())[::-1]
            ax.plot(np.arange(len(cw)), cw, label=" = ".join(group), **styles[group[0]])
        ax.axhline(1.0, color="#999999", linewidth=0.8, linestyle="--")
        ax.set_title(layer, fontsize=8)
        ax.set_xlabel("channel (sorted)", fontsize=7)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(True, alpha=0.3)
        if source_strength:
            ax = axes[1, col]
            w = weights[first][layer].double()
            cw = (w * w.numel()).numpy()
            strength = source_strength[layer].double().numpy()
            ax.scatter(strength, cw, s=6, color=styles[first]["color"], alpha=0.7)
            ax.axhline(1.0, color="#999999", linewidth=0.8, linestyle="--")
            ax.set_xscale("log")
            plain_log_axis(ax.xaxis)
            ax.set_title(f"Spearman ρ = {spearman(strength, cw):.2f}", fontsize=8)
            ax.set_xlabel("source mean |activation|", fontsize=7)
            ax.tick_params(which="both", labelsize=7)
            ax.grid(True, alpha=0.3)
    axes[0, 0].set_ylabel("C · weight (1 = uniform)", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    if source_strength:
        axes[1, 0].set_ylabel(f"C · weight ({first})", fontsize=8)
    fig.suptitle("DELTA channel attention per tapped layer")
    return fig


def attention_analysis(runs: Sequence[Run], out_dir: str,
                       source_strength: Mapping[str, Tensor] | None = None) -> AnalysisResult:
    """Write ``attention.{png,svg,json}`` for the runs that have ``attention.json``.

    Args:
        source_strength: layer -> (C,) mean |activation| of the source network on sample images
            (:func:`~deltatl.analysis.activations.channel_strength`); adds the bottom row.

    Raises:
        DeltatlError: no run has attention weights.
    """
    delta = [r for r in runs if r.attention_path]
    if not delta:
        raise DeltatlError("no run has attention.json (only method delta computes channel attention)")
    weights = {r.label: run_weights(r) for r in delta}
    layers = list(weights[delta[0].label])
    notes = []
    differing = [label for label, w in weights.items() if list(w) != layers
                 or any(w[l].numel() != weights[delta[0].label][l].numel() for l in layers)]
    for label in differing:
        del weights[label]
    if differing:
        notes.append("left out (other layers): " + ", ".join(differing))
    if source_strength is not None and any(
            l not in source_strength or source_strength[l].numel() != weights[delta[0].label][l].numel()
            for l in layers):
        source_strength = None
    stats = {label: {l: weight_stats(w[l]) for l in layers} for label, w in weights.items()}
    data: dict[str, Any] = {"layers": layers, "runs": stats,
                            "weights": {label: {l: w[l].tolist() for l in layers} for label, w in weights.items()}}
    if source_strength is not None:
        data["spearman_with_source_activation"] = {
            label: {l: spearman(source_strength[l].numpy(), w[l].numpy()) for l in layers}
            for label, w in weights.items()}
    labels = list(weights)
    if len(labels) > 1:
        data["spearman_between_runs"] = {
            f"{a} / {b}": {l: spearman(weights[a][l].numpy(), weights[b][l].numpy()) for l in layers}
            for i, a in enumerate(labels) for b in labels[i + 1:]}
    files = [write_json(os.path.join(out_dir, f"{NAME}.json"), data, indent=None)]
    styles = run_styles(labels, [r.spec for r in delta if r.label in weights])
    figure = save_figure(plot_attention(weights, styles, source_strength), out_dir, NAME)
    header = ["run", "layer", "channels", "max C·w", "min C·w", "effective share", "top 10% hold",
              "favoured channels (C·w)"]
    if source_strength is not None:
        header.append("ρ with source activation")
    rows = []
    for label in labels:
        for l in layers:
            s = stats[label][l]
            row = [label, l, str(s["channels"]), fmt(s["max_cw"]), fmt(s["min_cw"]), fmt(s["effective_share"]),
                   f"{100 * s['top10pct_share']:.0f}%",
                   ", ".join(f"{c} ({cw:.2f})" for c, cw in zip(s["favoured"], s["favoured_cw"]))]
            if source_strength is not None:
                row.append(fmt(data["spearman_with_source_activation"][label][l]))
            rows.append(row)
    return AnalysisResult(NAME, "Channel attention",
                          "The DELTA weights per tapped layer as C·w (1 = uniform, as in DELTA w/o ATT): their "
                          "distribution, and how they relate to the source network's channel activations.",
                          figures=[figure], data_files=files, tables=[Table("Attention weights per layer", header, rows)],
                          notes=notes)
