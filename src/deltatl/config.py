"""The resolved configuration of a training run, read from YAML files and command-line flags.

Precedence: built-in defaults < ``--config file.yaml`` < explicit command-line flags. Library
functions never see this object: :mod:`deltatl.run` converts it into explicit arguments.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, fields
from typing import Any

import yaml

from .errors import DeltatlError
from .models import EMBEDDED_MODEL


@dataclass
class TrainConfig:
    """Everything that determines a run's result. Field names are the CLI flags with ``_`` for ``-``."""

    # data
    data: str = "fashion-mnist"
    data_root: str | None = None
    train_per_class: int | None = None  # None: the dataset's default (30 for fashion-mnist, else all); 0: all
    val_per_class: int | None = None
    val_fraction: float = 0.2
    test_per_class: int | None = None  # None: the whole test set
    image_size: int = 96
    resize: int | None = None
    check_images: bool = True
    # model
    model: str = EMBEDDED_MODEL
    pretrained: str = "auto"
    checkpoint: str | None = None
    head_init: str = "default"
    # method (alpha and beta: the official 0.01 / 0.01)
    method: str = "l2"
    alpha: float = 0.01
    beta: float = 0.01
    delta_layers: list[str] | None = None  # None: the architecture's preset
    delta_reduction: str = "sum"  # official: summed over the batch; "mean" divides by the batch size
    # supervised channel attention (method delta); defaults = the official procedure
    attention_file: str | None = None  # raw scores to use instead of computing them
    attention_method: str = "exact"  # or "first_order" (activation x gradient approximation)
    attention_epochs: int = 10
    attention_lr: float = 0.01
    attention_batches: int = 4
    attention_batch_size: int = 32
    attention_bn_train: bool = True  # official quirk: BatchNorm statistics adapt during the L2-FE fit
    attention_temperature: float = 5.0
    # RIFLE
    rifle: int = 0
    rifle_reset_momentum: bool = False
    rifle_cyclic_lr: bool = False
    # optimisation
    epochs: int | None = None
    iters: int | None = None
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float | None = None  # None: the method's default
    schedule: str = "step"
    seed: int = 0
    # precision and DDP (change the result): autocast dtype; under torchrun, global-batch BatchNorm
    amp: str = "none"
    sync_bn: bool = False
    # execution (does not change the result, apart from floating-point noise across devices)
    device: str = "auto"
    channels_last: bool = False
    compile: bool = False
    workers: int = 0
    eval_every: int = 1
    out: str | None = None
    attention_cache: str | None = None  # default ~/.cache/deltatl/attention

    DEFAULT_EPOCHS = 10

    def __post_init__(self) -> None:
        for name, low in (("image_size", 8), ("batch_size", 1), ("eval_every", 1), ("workers", 0)):
            if getattr(self, name) < low:
                raise DeltatlError(f"--{name.replace('_', '-')} must be at least {low}")
        if self.epochs is not None and self.iters is not None:
            raise DeltatlError("give --epochs or --iters, not both")
        for name in ("epochs", "iters"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DeltatlError(f"--{name} must be at least 1")
        if self.rifle < 0:
            raise DeltatlError("--rifle must be >= 0")
        if self.delta_reduction not in ("sum", "mean"):
            raise DeltatlError("--delta-reduction must be sum or mean")
        if self.amp not in ("none", "bf16", "fp16"):
            raise DeltatlError("--amp must be none, bf16 or fp16")
        if self.attention_method not in ("exact", "first_order", "naive"):
            raise DeltatlError("--attention-method must be exact, first_order or naive")
        if self.lr <= 0:
            raise DeltatlError("--lr must be positive")
        if not 0 <= self.val_fraction < 1:
            raise DeltatlError("--val-fraction must be in [0, 1)")
        if self.train_per_class is not None and self.train_per_class < 0:
            raise DeltatlError("--train-per-class must be positive (0 = all images)")

    def result_fields(self) -> dict[str, Any]:
        """The fields that define what a run computes (compared when a run directory is reused)."""
        skip = {"device", "workers", "out", "attention_cache", "channels_last", "compile"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


_TYPES = {f.name: str(f.type) for f in fields(TrainConfig)}


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML mapping of config keys (``-`` or ``_`` both accepted); unknown keys are an error."""
    if not os.path.isfile(path):
        raise DeltatlError(f"config file not found: {path}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise DeltatlError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise DeltatlError(f"{path} must hold a mapping of settings")
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - set(_TYPES))
    if unknown:
        raise DeltatlError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    return values


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(key: str, value: Any) -> Any:
    """Check a value against the field's annotation (``int``, ``float | None``...)."""
    kinds = [k.strip() for k in _TYPES[key].split("|")]
    if value is None and "None" in kinds:
        return None
    if "bool" in kinds and isinstance(value, bool):
        return value
    if "int" in kinds and isinstance(value, int) and not isinstance(value, bool):
        return value
    if "float" in kinds and isinstance(value, str) and _SCIENTIFIC.fullmatch(value):
        value = float(value)  # YAML 1.1 (PyYAML) reads 1e-4 as a string
    if "float" in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if "str" in kinds and isinstance(value, str):
        return value
    if "list[str]" in kinds and isinstance(value, (list, tuple, str)):
        items = value.split(",") if isinstance(value, str) else value
        if all(isinstance(v, str) for v in items):
            return [v.strip() for v in items if v.strip()]
    raise DeltatlError(f"setting {key.replace('_', '-')} must be {' or '.join(kinds)}, got {value!r}")


def make_config(file_values: dict[str, Any], cli_values: dict[str, Any]) -> TrainConfig:
    """Defaults, then the file, then the flags given on the command line."""
    values = {k: _coerce(k, v) for k, v in {**file_values, **cli_values}.items()}
    return TrainConfig(**values)


def dump_yaml(config: TrainConfig, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(config.result_fields(), f, sort_keys=False)
    os.replace(tmp, path)


def read_run_config(path: str) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f) or {}
