"""From a :class:`~deltatl.config.TrainConfig` to a finished run directory.

This is the edge where configuration becomes explicit arguments for the library: datasets, model,
objective and :func:`~deltatl.engine.fit.fit`. The CLI, ``deltatl demo`` and the searches call
:func:`train_run`.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from .config import TrainConfig, dump_yaml, read_run_config
from .data import DATASETS, DataSplits, TransformedImages, load_splits
from .data.transforms import eval_transform, train_transform
from .engine.fit import CHECKPOINT, SUMMARY, epoch_steps, fit
from .engine.objective import Objective, get_method
from .errors import DeltatlError
from .models import create_model, preprocessing

# Few-shot default of a named dataset when --train-per-class is not given (the embedded default job).
DEFAULT_TRAIN_PER_CLASS = {"fashion-mnist": 30}
CONFIG_FILE = "config.yaml"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeltatlError(f"unknown device '{name}' (cpu, cuda, cuda:N, mps or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeltatlError("--device cuda requested but no CUDA device is available")
    return device


def default_out(config: TrainConfig) -> str:
    data = os.path.basename(os.path.normpath(config.data)) if config.data not in DATASETS else config.data
    return os.path.join("runs", f"{config.method}_{data}_{config.model.replace('/', '-')}_seed{config.seed}")


def train_per_class(config: TrainConfig) -> int | None:
    if config.train_per_class is None:
        return DEFAULT_TRAIN_PER_CLASS.get(config.data)
    return config.train_per_class or None  # 0 means all


def open_splits(config: TrainConfig) -> DataSplits:
    return load_splits(config.data, config.data_root, train_per_class=train_per_class(config),
                       val_per_class=config.val_per_class, val_fraction=config.val_fraction,
                       test_per_class=config.test_per_class, seed=config.seed, check_images=config.check_images)


def _prepare_run_dir(run_dir: str, config: TrainConfig, resume: bool) -> dict[str, Any] | None:
    """Refuse to mix two runs in one folder; return the summary if this exact run already finished."""
    config_path = os.path.join(run_dir, CONFIG_FILE)
    if os.path.isfile(config_path):
        previous = read_run_config(config_path)
        current = config.result_fields()
        changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if changed:
            raise DeltatlError(f"{run_dir} holds a different run (differs in: {', '.join(changed)}); "
                               f"choose another --out")
        summary_path = os.path.join(run_dir, SUMMARY)
        if os.path.isfile(summary_path):
            with open(summary_path) as f:
                return json.load(f)
        if not resume and os.path.isfile(os.path.join(run_dir, CHECKPOINT)):
            raise DeltatlError(f"{run_dir} holds an unfinished run of this config; pass --resume to continue it")
    elif os.path.isdir(run_dir) and os.listdir(run_dir):
        raise DeltatlError(f"{run_dir} is not empty and holds no deltatl run; choose another --out")
    return None


def train_run(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume, or reuse) the training run described by ``config``; return its summary."""
    method = get_method(config.method)
    run_dir = config.out or default_out(config)
    finished = _prepare_run_dir(run_dir, config, resume)
    if finished is not None:
        return {**finished, "reused": True}
    device = resolve_device(config.device)
    splits = open_splits(config)
    model = create_model(config.model, len(splits.classes), pretrained=config.pretrained,
                         checkpoint=config.checkpoint, head_init=config.head_init)
    os.makedirs(run_dir, exist_ok=True)
    lists_dir = os.path.join(run_dir, "splits")
    splits.check_lists(lists_dir)
    splits.write_lists(lists_dir)
    dump_yaml(config, os.path.join(run_dir, CONFIG_FILE))

    pre = preprocessing(model)
    train_set = TransformedImages(splits.train, train_transform(config.image_size, pre, config.resize),
                                  seed=config.seed)
    val_set = TransformedImages(splits.val, eval_transform(config.image_size, pre, config.resize))
    test_set = TransformedImages(splits.test, eval_transform(config.image_size, pre, config.resize))
    total_steps = config.iters or ((config.epochs or TrainConfig.DEFAULT_EPOCHS)
                                   * epoch_steps(len(splits.train), config.batch_size))
    run_info = {"method": config.method, "model": config.model, "data": config.data,
                "classes": splits.classes, "config": config.result_fields()}
    return fit(Objective(model, config.method), train_set, val_set, test_set, run_dir=run_dir,
               total_steps=total_steps, batch_size=config.batch_size, lr=config.lr,
               momentum=config.momentum,
               weight_decay=method.weight_decay if config.weight_decay is None else config.weight_decay,
               schedule=config.schedule, device=device, seed=config.seed, num_workers=config.workers,
               eval_every=config.eval_every, resume=resume, progress=progress, run_info=run_info)
