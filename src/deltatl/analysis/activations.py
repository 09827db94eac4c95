r"""Activation maps (DELTA paper, section 4.4 and Figure 4).

Pick the channels (convolution filters) of a tapped layer on which the *source* network (the run's
starting point, "SRC") has the lowest activation on sample test images, and show, for a few images,
each network's activation map of those channels overlaid on the image: one row per (channel, image),
one column per network (SRC, then each run). Every map is min-max normalised on its own,

.. math:: \hat a_i = \frac{a_i - \min_j a_j}{\max_j a_j - \min_j a_j},

over the positions :math:`i, j` of that one map (a constant map becomes all zeros), so the figure shows
*where* a channel responds, not how strongly.

"Activation" of a channel is its mean absolute output :math:`\frac{1}{NHW}\sum |a|` over the sample
images: the tapped layers are raw convolution outputs (before BatchNorm and activation, as DELTA taps
them), whose sign carries no meaning of its own. Alongside the figure: each network's activation of
those channels relative to the source's (has fine-tuning re-used them?) and the share of each
normalised map above 0.5 (small = a concentrated response).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import DeltatlError
from ..features import FeatureHooks
from ..modes import evaluating
from .plotting import AnalysisResult, Table, fmt, new_figure, save_figure, write_json
from .runs import Run, SampleImages, comparable_groups, map_layers, num_classes, start_model, trained_model

NAME = "activation_maps"
SOURCE = "SRC"
#: The deepest tapped layer whose maps are at least this many positions wide is drawn by default.
MIN_MAP_SIDE = 8
#: Keys that must agree for two runs' feature maps to be compared on the same images.
SAME_INPUT = ("model", "data", "data_root", "image_size", "resize")


def minmax_normalize(maps: Tensor) -> Tensor:
    r"""Min-max normalise every map over its last two (spatial) dimensions:
    :math:`\hat a_i = (a_i - \min_j a_j) / (\max_j a_j - \min_j a_j)`, in [0, 1]; a constant map gives 0.

    Args:
        maps: (..., H, W).
    """
    flat = maps.float().flatten(-2)
    low = flat.amin(dim=-1, keepdim=True)
    span = flat.amax(dim=-1, keepdim=True) - low
    # Rounding is monotonic, so (a - min) <= (max - min) and the ratio never exceeds 1; clamp anyway.
    scaled = torch.where(span > 0, (flat - low) / torch.where(span > 0, span, torch.ones_like(span)),
                         torch.zeros_like(flat))
    return scaled.clamp_(0.0, 1.0).view(maps.shape)


@torch.inference_mode()
def layer_outputs(model: nn.Module, layers: Sequence[str], images: Tensor, batch_size: int = 32) -> dict[str, Tensor]:
    """The outputs of ``layers`` for ``images`` (eval mode), as float32 CPU tensors (N, C, H, W)."""
    parts: dict[str, list[Tensor]] = {name: [] for name in layers}
    device = next(model.parameters()).device
    with evaluating(model), FeatureHooks(model, layers) as hooks:
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size].to(device))
            for name, value in hooks.pop().items():
                parts[name].append(value.float().cpu())
    return {name: torch.cat(values) for name, values in parts.items()}


def channel_strength(maps: Tensor) -> Tensor:
    r"""Mean absolute activation of each channel, :math:`\frac{1}{NHW}\sum_{n,h,w} |a_{n,c,h,w}|`: (C,)."""
    return maps.abs().mean(dim=(0, 2, 3))


def low_activation_channels(maps: Tensor, count: int) -> list[int]:
    """The ``count`` channels with the lowest :func:`channel_strength`, weakest first, skipping channels
    whose maps are constant on every image (a dead channel has nothing to show)."""
    strength = channel_strength(maps)
    flat = maps.flatten(2)
    varies = (flat.amax(dim=2) > flat.amin(dim=2)).any(dim=0)
    order = [int(c) for c in torch.argsort(strength) if varies[c]]
    return order[:count]


def default_map_layer(shapes: Mapping[str, Sequence[int]], min_side: int = MIN_MAP_SIDE) -> str:
    """The deepest layer (last in ``shapes``, which is in forward order) whose maps are at least
    ``min_side`` wide and high; the first layer if none is."""
    names = list(shapes)
    wide = [n for n in names if min(shapes[n][-2:]) >= min_side]
    return wide[-1] if wide else names[0]


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (..., h, w) maps to ``size`` (the image's pixels; align_corners=False, so map
    cell centres sit at the centres of the image regions they cover)."""
    shape = maps.shape
    out = F.interpolate(maps.reshape(-1, 1, *shape[-2:]).float(), size=size, mode="bilinear", align_corners=False)
    return out.reshape(*shape[:-2], *size)


@dataclass
class Networks:
    """The source network and each run's fine-tuned network, all of one architecture.

    ``trained`` is keyed by run label; ``source_of`` names the run whose starting point is ``source``.
    """

    source: nn.Module
    source_of: str
    trained: dict[str, nn.Module]
    layers: list[str]


def load_networks(runs: Sequence[Run], *, progress: bool = True,
                  load_trained: Callable[[Run], tuple[nn.Module, dict[str, Any]]] = trained_model) -> Networks:
    """Load every run's network and the first run's starting point (SRC). Runs from the same pretrained
    weights share the source backbone; only their new heads differ, which no feature map sees."""
    trained, source, layers, first = {}, None, [], runs[0]
    for run in tqdm(runs, desc="loading networks", unit="run", leave=False, disable=None if progress else True):
        model, info = load_trained(run)
        trained[run.label] = model.eval()
        if source is None:
            source = start_model(first, num_classes(first, info))
            layers = map_layers(source, first)
    assert source is not None
    return Networks(source, first.label, trained, layers)


@dataclass
class FeatureSample:
    """Tapped-layer outputs of every network on the same sample images."""

    images: SampleImages
    layers: list[str]
    outputs: dict[str, dict[str, Tensor]]  # network (SRC or run label) -> layer -> (N, C, H, W)


def collect_features(networks: Networks, images: SampleImages, progress: bool = True) -> FeatureSample:
    """Run SRC and every fine-tuned network on the sample images and keep their tapped-layer outputs
    (small: a few MB for 32 images of 96 px), shared by the activation-map and attention analyses."""
    outputs = {}
    models = {SOURCE: networks.source, **networks.trained}
    for name, model in tqdm(models.items(), desc="feature maps", unit="net", leave=False,
                            disable=None if progress else True):
        outputs[name] = layer_outputs(model, networks.layers, images.tensors)
    return FeatureSample(images, list(networks.layers), outputs)


def concentration(maps: Tensor, threshold: float = 0.5) -> Tensor:
    """Share of each normalised map at or above ``threshold``: (..., H, W) -> (...)."""
    return (minmax_normalize(maps) >= threshold).float().mean(dim=(-2, -1))


def overlay(picture: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image in grey blended with the jet colours of ``heat`` (values in [0, 1]): one RGB array, so a
    figure cell holds one image instead of two stacked (half the size in SVG)."""
    grey = picture.mean(axis=2, keepdims=True)
    colours = colormaps["jet"](heat)[..., :3]
    return np.clip((1 - alpha) * grey + alpha * colours, 0.0, 1.0)


def plot_activation_grid(pictures: np.ndarray, rows: Sequence[tuple[int, int]], columns: Sequence[str],
                         maps: Mapping[str, Tensor], row_labels: Sequence[str], layer: str) -> Figure:
    """Grid of overlays. ``maps[column]`` is (N, C, h, w); row ``r = (channel, image index)``."""
    size = pictures.shape[1:3]
    ncols = len(columns) + 1
    cell = 1.45
    fig = new_figure(cell * ncols + 0.9, cell * len(rows) + 0.8)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, (channel, image) in enumerate(rows):
        axes[r, 0].imshow(pictures[image], interpolation="none")
        axes[r, 0].set_ylabel(row_labels[r], fontsize=7, rotation=0, ha="right", va="center")
        for c, column in enumerate(columns, 1):
            # Normalise at the map's own resolution (the paper's a_i), then upsample for display.
            heat = upsample(minmax_normalize(maps[column][image, channel]), size).clamp(0, 1).numpy()
            axes[r, c].imshow(overlay(pictures[image], heat), interpolation="none")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    for c, title in enumerate(["image", *columns]):
        axes[0, c].set_title(title, fontsize=8)
    fig.suptitle(f"Min-max normalised activation maps of weak source channels ({layer})", fontsize=10)
    return fig


def activation_analysis(runs: Sequence[Run], out_dir: str, networks: Networks, sample: FeatureSample, *,
                        layer: str | None = None, filters: int = 3, images: int = 2) -> AnalysisResult:
    """Write ``activation_maps.{png,svg}`` and ``activation_maps.json``.

    Args:
        networks, sample: from :func:`load_networks` and :func:`collect_features` (shared with the
            other feature analyses).
        layer: the tapped layer to show (default :func:`default_map_layer`).
        filters: how many weak source channels; ``images``: how many sample images each.
    """
    shapes = {name: tuple(t.shape[1:]) for name, t in sample.outputs[SOURCE].items()}
    layer = layer or default_map_layer(shapes)
    if layer not in shapes:
        raise DeltatlError(f"`layer` {layer!r} is not a tapped layer of these runs ({', '.join(shapes)})")
    columns = [SOURCE, *networks.trained]
    maps = {name: sample.outputs[name][layer] for name in columns}
    channels = low_activation_channels(maps[SOURCE], filters)
    shown = list(range(min(images, len(sample.images.ids))))
    rows = [(c, i) for c in channels for i in shown]
    classes, targets = sample.images.classes, sample.images.targets
    labels = [f"ch {c}\n{classes[targets[i]]}" for c, i in rows]
    figure = save_figure(plot_activation_grid(sample.images.pictures, rows, columns, maps, labels, layer),
                         out_dir, NAME)
    strengths = {name: channel_strength(maps[name]) for name in columns}
    conc = {name: concentration(maps[name]) for name in columns}  # (N, C)
    data: dict[str, Any] = {
        "layer": layer, "map_size": list(shapes[layer][-2:]), "source": f"starting point of {networks.source_of}",
        "sample_images": sample.images.ids, "shown_images": [sample.images.ids[i] for i in shown],
        "channels": [{"channel": c,
                      "mean_abs_activation": {n: float(strengths[n][c]) for n in columns},
                      "relative_to_source": {n: float(strengths[n][c] / strengths[SOURCE][c]) for n in columns},
                      "share_above_half": {n: float(conc[n][:, c].mean()) for n in columns}}
                     for c in channels],
        "maps": [{"channel": c, "image": sample.images.ids[i],
                  "normalised": {n: np.round(minmax_normalize(maps[n][i, c]).numpy(), 4).tolist() for n in columns}}
                 for c, i in rows],
    }
    files = [write_json(os.path.join(out_dir, f"{NAME}.json"), data, indent=None)]
    table = Table(f"Weak source channels of {layer}: activation relative to SRC (mean |a| over "
                  f"{len(sample.images.ids)} test images) / share of the normalised map ≥ 0.5 (%)",
                  ["channel", *columns],
                  [[str(ch["channel"]), *(f"{fmt(ch['relative_to_source'][n])} / {fmt(100 * ch['share_above_half'][n], 0)}"
                                          for n in columns)] for ch in data["channels"]])
    notes = []
    if len({source_identity(r) for r in runs}) > 1:
        notes.append(f"SRC is the starting point of {networks.source_of}; some runs started from other weights.")
    return AnalysisResult(NAME, "Activation maps",
                          f"Channels of {layer} on which the source network has the lowest mean |activation| on "
                          f"{len(sample.images.ids)} test images; each map min-max normalised on its own and "
                          "overlaid on the image (jet: blue 0 to red 1). The paper's Figure 4.",
                          figures=[figure], data_files=files, tables=[table], notes=notes)


def same_input_group(runs: Sequence[Run]) -> tuple[list[Run], list[str]]:
    """The runs whose networks see the same images (same model, data and sizes), and a note on the rest."""
    group = comparable_groups(runs, SAME_INPUT)[0]
    left = [r.label for r in runs if r not in group]
    return group, ([f"left out (other model, data or image size): {', '.join(left)}"] if left else [])


def source_identity(run: Run) -> tuple[Any, ...]:
    """What determines a run's source backbone: the weights' origin (and, for a random init, the seed)."""
    pretrained = run.config.get("pretrained")
    return (run.config.get("model"), pretrained, run.config.get("checkpoint"),
            run.seed if pretrained == "none" else None)
