r"""Keypoint activations (DELTA paper, section 4.4 and Table 3).

CUB-200-2011 annotates up to 15 discriminative parts per bird (beak, crown, tail...) with a pixel
location. For every test image, every network (SRC and each run) and every tapped layer, each channel's
map is min-max normalised (:func:`~deltatl.analysis.activations.minmax_normalize`) and read at each
visible part location; the value of a part is the mean over the channels,

.. math:: v_{p} = \frac{1}{C}\sum_{c} \hat a_c(x_p, y_p) \in [0, 1],

where :math:`\hat a_c(x, y)` is the normalised map interpolated bilinearly at the part's position in the
network's input (the run's resize and centre crop applied to the annotated coordinates; parts cut away
by the crop are skipped). Reported: the mean of :math:`v_p` over all visible parts of all images, and
(on the paper's scale, whose numbers exceed 1) the mean over images of the sum over an image's visible
parts. The paper does not say which layer it used, so every tapped layer gets a row.

Coordinates are continuous pixel coordinates: (0, 0) is the top-left corner of the image, and the
centre of map cell (i, j) of an h x w map over a W x H input lies at ((j + 0.5) W / w, (i + 0.5) H / h).

Keypoints come from :func:`deltatl.data.cub.part_locations` (``parts/parts.txt`` and
``parts/part_locs.txt`` in CUB's format): automatically for runs on ``--data cub200``, or from any
folder in that format given explicitly (its ``images.txt`` paths are matched to the end of the run's
image ids).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor
from tqdm import tqdm

from ..data.cub import PartLocations, part_locations
from ..data.transforms import default_resize, eval_transform
from ..errors import DeltatlError
from ..models import preprocessing
from ..run import open_splits
from .activations import SOURCE, Networks, layer_outputs, minmax_normalize
from .plotting import METHOD_COLOURS, AnalysisResult, Table, fmt, new_figure, run_styles, save_figure, write_json
from .runs import Run, pick_spread, resized_size

NAME = "keypoints"


def transform_points(points: np.ndarray, original_size: tuple[int, int], resize: int, crop: int,
                     keep_aspect: bool = False) -> np.ndarray:
    """Map (P, 2) x, y positions in the original image to the network input: the runs' evaluation
    transform, a resize (to a ``resize`` square, or with ``keep_aspect`` the shorter edge to ``resize``)
    then a centre crop of ``crop`` (torchvision's crop offsets)."""
    width, height = original_size
    new_width, new_height = resized_size(original_size, resize, keep_aspect)
    out = np.asarray(points, dtype=np.float64).copy()
    out[:, 0] = out[:, 0] * new_width / width - int(round((new_width - crop) / 2.0))
    out[:, 1] = out[:, 1] * new_height / height - int(round((new_height - crop) / 2.0))
    return out


def sample_at_points(maps: Tensor, points: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear values of (C, h, w) maps at (P, 2) x, y positions of an input of ``size`` = (H, W)
    pixels: (C, P). Positions beyond the outer cell centres take the border value."""
    height, width = size
    grid = torch.empty(1, 1, len(points), 2, dtype=torch.float32)
    grid[0, 0, :, 0] = 2 * points[:, 0].float() / width - 1  # align_corners=False: -1 and 1 are the edges
    grid[0, 0, :, 1] = 2 * points[:, 1].float() / height - 1
    values = F.grid_sample(maps.float().unsqueeze(0), grid, mode="bilinear", padding_mode="border",
                           align_corners=False)
    return values[0, :, 0, :]


def keypoint_activation(maps: Tensor, points: Tensor, size: tuple[int, int]) -> Tensor:
    """The normalised activation at each point: min-max normalise each channel's map, read it at the
    points, average over the channels. (C, h, w), (P, 2) -> (P,) in [0, 1]."""
    return sample_at_points(minmax_normalize(maps), points, size).mean(dim=0)


def match_keypoints(ids: Sequence[str], locations: PartLocations) -> dict[int, np.ndarray]:
    """Position in ``ids`` -> (parts, 3) keypoints, for the images that have annotations.

    A run's id matches an annotation's image path exactly, or ends with ``/`` + the path as listed in
    ``images.txt`` (so an image folder built from CUB's files matches too).
    """
    by_path = {}
    for key, value in locations.keypoints.items():
        by_path[key] = value
        by_path.setdefault(key.removeprefix("images/"), value)
    found = {}
    for position, image_id in enumerate(ids):
        value = by_path.get(image_id)
        if value is None:
            parts = image_id.split("/")
            # Suffixes of two path components at least (class folder + file name).
            for k in range(1, max(1, len(parts) - 1)):
                value = by_path.get("/".join(parts[k:]))
                if value is not None:
                    break
        if value is not None:
            found[position] = value
    return found


def keypoints_source(run: Run, keypoint_root: str | None) -> PartLocations | None:
    """The part locations for a run: from ``keypoint_root`` if given, else from the run's CUB data."""
    if keypoint_root:
        return part_locations(keypoint_root)
    if run.config.get("data") == "cub200" and run.config.get("data_root"):
        return part_locations(str(run.config["data_root"]))
    return None


def plot_keypoints(per_layer: Mapping[str, Mapping[str, float]], per_part: Mapping[str, Sequence[float]],
                   parts: Sequence[str], layer: str, styles: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Left: mean normalised activation at the parts per layer and network (grouped bars). Right: per part
    for ``layer``."""
    networks = list(next(iter(per_layer.values())))
    layers = list(per_layer)
    fig = new_figure(12.0, 4.2)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})
    width = 0.8 / len(networks)
    for k, name in enumerate(networks):
        xs = np.arange(len(layers)) + (k - (len(networks) - 1) / 2) * width
        left.bar(xs, [per_layer[layer_][name] for layer_ in layers], width, label=name,
                 color=styles[name]["color"])
        # Thin lines only guide the eye from part to part; the parts have no order.
        right.plot(range(len(parts)), per_part[name], marker="o", markersize=4, label=name, linewidth=0.7,
                   alpha=0.85, color=styles[name]["color"], linestyle=styles[name]["linestyle"])
    left.set_xticks(range(len(layers)), layers, rotation=25, ha="right", fontsize=7)
    left.set_ylabel("mean normalised activation at parts")
    left.set_title("per tapped layer", fontsize=9)
    # Headroom above the bars for the legend (the bars of all networks are often of similar height).
    top = max((v for per in per_layer.values() for v in per.values()), default=1.0)
    left.set_ylim(0, 1.35 * top if top > 0 else 1.0)
    left.legend(fontsize=7, ncol=3, loc="upper center")
    right.set_xticks(range(len(parts)), parts, rotation=60, ha="right", fontsize=7)
    right.set_title(f"per part ({layer})", fontsize=9)
    for ax in (left, right):
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Normalised activation at annotated part locations")
    return fig


def keypoint_analysis(runs: Sequence[Run], out_dir: str, networks: Networks, locations: PartLocations, *,
                      layer: str, count: int = 300, seed: int = 0, batch_size: int = 32,
                      progress: bool = True) -> AnalysisResult:
    """Write ``keypoints.{png,svg,json}`` for the runs' test images that have part annotations.

    Args:
        networks: SRC and the runs' networks (:func:`~deltatl.analysis.activations.load_networks`).
        locations: the part annotations.
        layer: the layer of the per-part panel (the others are in the table).
        count: test images used (seeded, spread over the classes); 0 = every annotated test image.
    """
    first = runs[0]
    config = first.train_config()
    test = open_splits(config, progress=False).test
    annotated = match_keypoints(test.ids, locations)
    if not annotated:
        raise DeltatlError(f"none of the test images of {first.path} has part annotations "
                           f"({len(locations.keypoints)} annotated images)")
    positions = sorted(annotated)
    if count and count < len(positions):
        chosen = pick_spread([test.targets[p] for p in positions], count, seed)
        positions = sorted(positions[i] for i in chosen)
    size = config.image_size
    resize = config.resize or default_resize(size)
    keep_aspect = bool(getattr(config, "keep_aspect", False))
    transform = eval_transform(size, preprocessing(networks.source), config.resize, keep_aspect)
    models = {SOURCE: networks.source, **networks.trained}
    parts = locations.parts
    # sums[network][layer]: total of v_p, count of parts; per part totals for every layer.
    # A layer whose maps are a single position has nothing to locate (its normalised map is 0).
    probe = layer_outputs(networks.source, networks.layers, transform(test.load(positions[0])).unsqueeze(0))
    layers = [l for l in networks.layers if min(probe[l].shape[-2:]) > 1]
    dropped = [l for l in networks.layers if l not in layers]
    if not layers:
        raise DeltatlError("every tapped layer has 1x1 maps at this image size: no location to read")
    if layer not in layers:
        layer = layers[0]
    totals = {n: {l: np.zeros(len(parts)) for l in layers} for n in models}
    counts = np.zeros(len(parts))
    images_used = 0
    for start in tqdm(range(0, len(positions), batch_size), desc="keypoints", unit="batch", leave=False,
                      disable=None if progress else True):
        batch = positions[start:start + batch_size]
        tensors, points, visible = [], [], []
        for p in batch:
            image = test.load(p)
            tensors.append(transform(image))
            keys = annotated[p]
            xy = transform_points(keys[:, :2], image.size, resize, size, keep_aspect)
            inside = (xy >= 0).all(axis=1) & (xy < size).all(axis=1)
            points.append(torch.from_numpy(xy))
            visible.append((keys[:, 2] > 0) & inside)
        images_used += sum(bool(v.any()) for v in visible)
        for v in visible:
            counts += v
        inputs = torch.stack(tensors)
        for name, model in models.items():
            outputs = layer_outputs(model, layers, inputs, batch_size)
            for layer_name, maps in outputs.items():
                for b in range(len(batch)):
                    if not visible[b].any():
                        continue
                    values = keypoint_activation(maps[b], points[b], (size, size)).double().numpy()
                    totals[name][layer_name] += np.where(visible[b], values, 0.0)
    if counts.sum() == 0:
        raise DeltatlError("no visible part falls inside the networks' input crops")
    per_layer = {l: {n: float(totals[n][l].sum() / counts.sum()) for n in models} for l in layers}
    per_image_sum = {l: {n: float(totals[n][l].sum() / max(images_used, 1)) for n in models} for l in layers}
    with np.errstate(invalid="ignore", divide="ignore"):
        per_part = {n: (totals[n][layer] / counts).tolist() for n in models}
    data = {"layers": layers, "parts": parts, "images": len(positions), "images_with_parts": images_used,
            "visible_parts": counts.astype(int).tolist(), "source": f"starting point of {networks.source_of}",
            "mean_per_part": per_layer, "mean_sum_per_image": per_image_sum,
            "per_part": {l: {n: (totals[n][l] / np.maximum(counts, 1)).tolist() for n in models}
                         for l in layers}}
    files = [write_json(os.path.join(out_dir, f"{NAME}.json"), data)]
    names = list(models)
    styles = {SOURCE: {"color": METHOD_COLOURS["src"], "linestyle": "-"},
              **run_styles([r.label for r in runs], [r.spec for r in runs])}
    figure = save_figure(plot_keypoints(per_layer, per_part, parts, layer, styles), out_dir, NAME)
    tables = [Table("Mean normalised activation at a visible part (0-1)", ["layer", *names],
                    [[l, *(fmt(per_layer[l][n], 3) for n in names)] for l in layers]),
              Table("Sum over an image's visible parts, mean over images (the paper's Table 3 scale)",
                    ["layer", *names], [[l, *(fmt(per_image_sum[l][n], 3) for n in names)] for l in layers])]
    return AnalysisResult(NAME, "Keypoint activations",
                          f"Normalised activation at the annotated part locations of {len(positions)} test images "
                          "(the paper's Table 3).", figures=[figure], data_files=files, tables=tables,
                          notes=[f"left out (1x1 maps): {', '.join(dropped)}"] if dropped else [])
