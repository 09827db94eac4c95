"""Reading run directories for the analyses: files, labels, models and sample images.

A run directory (written by :func:`deltatl.run.train_run`) holds ``config.yaml``, ``metrics.jsonl``,
``checkpoint.pt``, ``summary.json`` once finished, ``splits/`` and, for DELTA, ``attention.json``.
:func:`load_run` reads the small files; models and images are loaded on demand
(:func:`trained_model`, :func:`start_model`, :func:`sample_images`) because they cost seconds.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from ..config import OFFICIAL_ALPHA, TrainConfig, make_config, read_run_config
from ..data.transforms import eval_transform, resize_transform
from ..engine.fit import CHECKPOINT, METRICS, SUMMARY
from ..methods import get_method
from ..errors import DeltatlError
from ..features import layer_preset
from ..models import Preprocessing, create_model, preprocessing
from ..run import CONFIG_FILE, open_splits, seeded_model

ATTENTION_FILE = "attention.json"
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass
class Run:
    """The small files of one run directory.

    Attributes:
        path: the run directory.
        config: ``config.yaml`` (the settings that define the run).
        metrics: the rows of ``metrics.jsonl`` in file order: evaluation rows (``epoch``, ``step``,
            ``lr``, ``train/...``, ``val/...``, ``head/norm``, ``seconds``) and event rows
            (``{"step": s, "event": "rifle"}``).
        summary: ``summary.json``, or None while the run has not finished.
        label: a short name, unique among the runs of one report (see :func:`label_runs`).
    """

    path: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    label: str = ""

    @property
    def method(self) -> str:
        return str(self.config.get("method", "l2"))

    @property
    def rifle(self) -> int:
        return int(self.config.get("rifle") or 0)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed") or 0)

    @property
    def spec(self) -> str:
        """``delta``, ``l2-sp``, ``delta+rifle3``...: the method as ``deltatl compare`` names it."""
        return f"{self.method}+rifle{self.rifle}" if self.rifle else self.method

    @property
    def alpha(self) -> float | None:
        """The regularization weight, for the methods that have one."""
        try:
            method = get_method(self.method)
        except DeltatlError:
            return None
        if not method.uses("alpha"):
            return None
        # config.yaml holds the resolved alpha (runs written before alpha had per-method defaults: 0.01)
        alpha = self.config.get("alpha")
        return OFFICIAL_ALPHA if alpha is None else float(alpha)

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def eval_rows(self) -> list[dict[str, Any]]:
        """The rows written at epoch ends (not the event rows)."""
        return [row for row in self.metrics if "event" not in row]

    @property
    def rifle_steps(self) -> list[int]:
        """Steps after which the head was re-initialised, as logged."""
        return [int(row["step"]) for row in self.metrics if row.get("event") == "rifle"]

    @property
    def attention_path(self) -> str | None:
        path = os.path.join(self.path, ATTENTION_FILE)
        return path if os.path.isfile(path) else None

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.path, CHECKPOINT)

    def train_config(self) -> TrainConfig:
        """The run's settings as a :class:`TrainConfig`; images are not re-checked (that costs a full
        decode of the dataset and the run already did it)."""
        values = {k: v for k, v in self.config.items() if k in _CONFIG_FIELDS}
        values["check_images"] = False
        return make_config({}, values)


def _read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    rows = []
    for k, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if k == len(lines) - 1 and not line.endswith("\n"):
                break  # the row a running training is writing right now
            raise DeltatlError(f"{path}:{n} is not a JSON line") from None
        if not isinstance(row, dict) or "step" not in row:
            raise DeltatlError(f"{path}:{n} is not a metrics row")
        rows.append(row)
    return rows


def _run_dirs_below(path: str, limit: int = 3) -> list[str]:
    """Run directories inside ``path`` (for the error message of a path that is not one)."""
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in ("splits", "attention_fe"))
        if CONFIG_FILE in files and METRICS in files:
            found.append(root)
            dirs[:] = []
        if len(found) >= limit:
            break
    return found


def load_run(path: str) -> Run:
    """Read a run directory's config, metrics and summary.

    Raises:
        DeltatlError: ``path`` is not a run directory (one line; if run directories lie below it,
            the message names a few of them).
    """
    if not os.path.isdir(path):
        raise DeltatlError(f"{path} is not a run directory (no such folder)")
    config_path, metrics_path = os.path.join(path, CONFIG_FILE), os.path.join(path, METRICS)
    if not (os.path.isfile(config_path) and os.path.isfile(metrics_path)):
        below = _run_dirs_below(path)
        hint = f"; run directories below it: {', '.join(below)}" if below else ""
        raise DeltatlError(f"{path} is not a run directory (no {CONFIG_FILE} and {METRICS}){hint}")
    try:
        config = read_run_config(config_path)
    except Exception as exc:  # YAML errors of several kinds; all mean a damaged file
        raise DeltatlError(f"cannot read {config_path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise DeltatlError(f"{config_path} does not hold a mapping of settings")
    summary = None
    summary_path = os.path.join(path, SUMMARY)
    if os.path.isfile(summary_path):
        try:
            with open(summary_path) as f:
                summary = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise DeltatlError(f"cannot read {summary_path}: {exc}") from None
    return Run(path=os.path.normpath(path), config=config, metrics=_read_metrics(metrics_path), summary=summary)


def label_runs(runs: Sequence[Run]) -> None:
    """Give every run a short unique label: its method spec, then alpha and seed where needed.

    One seed per method gives ``l2``, ``l2-sp``, ``delta``...; two seeds of a method give
    ``delta s0``, ``delta s1``; two alphas ``delta a=1e-05``, ``delta a=0.0001``.
    """
    def key(run: Run, parts: Sequence[str]) -> str:
        text = run.spec
        if "alpha" in parts and run.alpha is not None:
            text += f" a={run.alpha:g}"
        if "seed" in parts:
            text += f" s{run.seed}"
        if "path" in parts:
            text += f" ({run.path})"
        return text

    for parts in ((), ("alpha",), ("seed",), ("alpha", "seed"), ("alpha", "seed", "path")):
        labels = [key(run, parts) for run in runs]
        if len(set(labels)) == len(labels):
            break
    for run, label in zip(runs, labels):
        run.label = label


def load_runs(paths: Sequence[str]) -> list[Run]:
    """:func:`load_run` for each path (a path given twice is one run), then :func:`label_runs`."""
    if not paths:
        raise DeltatlError("no run directories given")
    seen: dict[str, Run] = {}
    for path in paths:
        run = load_run(path)
        seen.setdefault(os.path.realpath(run.path), run)
    runs = list(seen.values())
    label_runs(runs)
    return runs


def comparable_groups(runs: Sequence[Run], keys: Sequence[str]) -> list[list[Run]]:
    """Partition runs by the config values ``keys`` (e.g. the model and image size), largest group first
    (ties: the group of the earlier run). Analyses that compare feature maps need one group."""
    groups: dict[tuple[Any, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(run.config.get(k) for k in keys), []).append(run)
    return sorted(groups.values(), key=lambda g: -len(g))


def trained_model(run: Run) -> tuple[nn.Module, dict[str, Any]]:
    """The run's final (or, while it trains, latest) target network in eval mode, and its run info."""
    from ..predict import load_trained

    return load_trained(run.checkpoint_path)


def start_model(run: Run, num_classes: int) -> nn.Module:
    """The network the run started from, rebuilt exactly: the same weight source (embedded, hub,
    checkpoint file, or a random init drawn from the run's seed) and the same seeded new head.

    Raises:
        DeltatlError: the weights cannot be rebuilt here (e.g. a ``--checkpoint`` file that moved, or
            hub weights without internet).
    """
    config = run.train_config()
    return seeded_model(config, num_classes).eval()


def map_layers(model: nn.Module, run: Run) -> list[str]:
    """The layers DELTA taps for this run (``--delta-layers`` or the architecture's preset): the layers
    the feature-map analyses look at, whatever the run's method."""
    if run.config.get("delta_layers"):
        return list(run.config["delta_layers"])
    size = int(run.config.get("image_size", TrainConfig.image_size))
    try:
        return layer_preset(model, str(run.config.get("model")), input_size=(3, size, size))
    except ValueError as exc:
        raise DeltatlError(str(exc)) from None


@dataclass
class SampleImages:
    """Test images of a run, both as the network sees them and as a person does.

    Attributes:
        tensors: (N, 3, S, S) normalised network inputs (the run's evaluation transform).
        pictures: (N, S, S, 3) float arrays in [0, 1]: the same crops before normalisation.
        ids: image ids in the run's dataset (as in ``splits/test.txt``).
        targets: class indices; ``classes`` their names.
        original_sizes: (width, height) of each image file before resizing.
        indices: positions of the images in the run's test split.
    """

    tensors: torch.Tensor
    pictures: np.ndarray
    ids: list[str]
    targets: list[int]
    classes: list[str]
    original_sizes: list[tuple[int, int]]
    indices: list[int]


def pick_spread(targets: Sequence[int], count: int, seed: int) -> list[int]:
    """``count`` positions, seeded, visiting the classes in turn (so a few images show several classes).

    Returns fewer than ``count`` positions only if there are fewer images.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i in rng.permutation(len(targets)).tolist():
        by_class.setdefault(int(targets[i]), []).append(i)
    queues = [by_class[c] for c in sorted(by_class, key=lambda c: by_class[c][0])]
    picked: list[int] = []
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


def sample_images(run: Run, count: int, *, seed: int = 0, split: str = "test",
                  indices: Sequence[int] | None = None, pre: Preprocessing | None = None,
                  progress: bool = False) -> SampleImages:
    """``count`` images of the run's ``split`` (seeded, spread over the classes), or the given positions.

    Args:
        pre: the input normalisation of the run's network (default: read from its architecture).

    Raises:
        DeltatlError: the run's dataset cannot be opened here.
    """
    config = run.train_config()
    collection = getattr(open_splits(config, progress=progress), split)
    if len(collection) == 0:
        raise DeltatlError(f"the {split} split of {run.path} is empty")
    chosen = list(indices) if indices is not None else pick_spread(collection.targets, count, seed)
    size = config.image_size
    keep_aspect = bool(getattr(config, "keep_aspect", False))
    if pre is None:
        # The architecture alone knows its normalisation; no weights are needed for that.
        pre = preprocessing(create_model(config.model, None, pretrained="none"))
    to_input = eval_transform(size, pre, config.resize, keep_aspect)
    # The same geometry without the normalisation: what the network sees, as a picture.
    to_picture = T.Compose([resize_transform(size, pre, config.resize, keep_aspect), T.CenterCrop(size)])
    tensors, pictures, sizes = [], [], []
    for i in chosen:
        image: Image.Image = collection.load(i)
        sizes.append(image.size)
        tensors.append(to_input(image))
        pictures.append(np.asarray(to_picture(image), dtype=np.float32) / 255.0)
    return SampleImages(torch.stack(tensors), np.stack(pictures), [collection.ids[i] for i in chosen],
                        [collection.targets[i] for i in chosen], list(collection.classes), sizes, chosen)


def num_classes(run: Run, info: dict[str, Any] | None = None) -> int:
    """Number of target classes, from the summary or the checkpoint's run info."""
    for source in (run.summary, info):
        if source and source.get("classes"):
            return len(source["classes"])
    raise DeltatlError(f"{run.path}: cannot tell the number of classes (no summary.json or checkpoint)")



def resized_size(original_size: tuple[int, int], resize: int, keep_aspect: bool) -> tuple[int, int]:
    """(width, height) after the evaluation resize: a ``resize`` square, or (``keep_aspect``) the shorter
    edge to ``resize`` and the longer in proportion, rounded down as torchvision does."""
    width, height = original_size
    if not keep_aspect:
        return resize, resize
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize
