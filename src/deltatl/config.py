"""The resolved configuration of a training run, read from YAML files and command-line flags.

Precedence: built-in defaults < ``--config file.yaml`` < explicit command-line flags. Library
functions never see this object: :mod:`deltatl.run` converts it into explicit arguments.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, fields
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import yaml

from .engine.objective import SOURCE_BN_MODES
from .methods import Method, get_method
from .errors import DeltatlError
from .models import EMBEDDED_MODEL
from .outputs import atomic_open
from .regularizers import DELTA_REDUCTIONS

if TYPE_CHECKING:
    from .attention import AttentionSettings


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run's result. Field names are the CLI flags with ``_`` for ``-``.

    Frozen: a variant (a compare seed, a search fold) is ``dataclasses.replace(config, ...)``, so a
    config handed to one run can never be changed under another. Flat on purpose: one field per flag
    and per ``config.yaml`` key of a run folder; the library reads per-concern objects built from it
    (``attention_settings()``, the explicit arguments :mod:`deltatl.run` passes on)."""

    # data
    data: str = "fashion-mnist"
    data_root: str | None = None
    train_per_class: int | None = None  # None: the dataset's default (30 for fashion-mnist, else all); 0: all
    val_per_class: int | None = None
    val_fraction: float = 0.2
    test_per_class: int | None = None  # None: the whole test set
    # one run of k-fold cross-validation (set by `deltatl search`; no CLI flag): train on the training
    # split less fold cv_fold of cv_folds (stratified, seeded by --seed), validate on it, no test split
    cv_folds: int | None = None
    cv_fold: int | None = None
    image_size: int = 96
    resize: int | None = None
    # Table 2's "data augmentation" variant (Li et al. 2018): shorter edge resized to --resize keeping
    # the aspect ratio (train and test), and the logits averaged over 10 crops at evaluation
    keep_aspect: bool = False
    ten_crop: bool = False
    check_images: bool = True
    # model
    model: str = EMBEDDED_MODEL
    pretrained: str = "auto"
    checkpoint: str | None = None
    head_init: str = "default"
    # Inception-V3's auxiliary classifier: 0 removes it (default); W > 0 keeps it with a new head for
    # the target classes and adds W * its cross-entropy to the training loss (torchvision's recipe: 0.4)
    aux_weight: float = 0.0
    # method: delta by default, the method that beat plain fine-tuning (l2) on the embedded default
    # (README, "Measured on the embedded default"); alpha None: the default of the method and
    # --delta-reduction (see default_alpha); beta official
    method: str = "delta"
    alpha: float | None = None
    beta: float = 0.01
    delta_layers: list[str] | None = None  # None: the architecture's preset
    # DELTA's term: the official "sum" over the batch ("mean" divides it by the batch size) or "relative"
    # (each layer's term over the source's squared activation); see deltatl.regularizers
    delta_reduction: str = "sum"
    # the source's BatchNorm: its "running" ImageNet statistics (official) or the "batch"'s (the term is 0
    # at step 0); see deltatl.engine.objective.Objective. The defaults are the authors': the alternatives
    # did not beat them on the embedded default (README, "DELTA's defaults")
    delta_source_bn: str = "running"
    # L2-SP's gradient alpha * (w - w*) added after the backward instead of through autograd: equal up to
    # rounding (an execution setting, like channels_last), 2 % less peak memory and never slower in
    # deltatl bench (BENCHMARKS.md); False is the autograd term
    l2sp_fused: bool = True
    # supervised channel attention (method delta); defaults = the official procedure
    attention_file: str | None = None  # raw scores to use instead of computing them
    attention_method: str = "exact"  # or "first_order" (activation x gradient approximation)
    attention_epochs: int = 10
    attention_lr: float = 0.01
    attention_batches: int = 4
    attention_batch_size: int = 32
    attention_bn_train: bool = True  # official quirk: BatchNorm statistics adapt during the L2-FE fit
    attention_temperature: float = 5.0
    # wise-ft: the LP-FT run it interpolates (trained there unless finished); None: its `fine_tuned` subfolder
    fine_tuned: str | None = None
    # RIFLE
    rifle: int = 0
    rifle_reset_momentum: bool = False
    rifle_cyclic_lr: bool = False
    # the tricks RIFLE was compared with (deltatl.engine.tricks); all off by default (faithful)
    head_dropout: float = 0.0  # Dropout on the head's input
    head_dropconnect: float = 0.0  # DropConnect on the head's weights
    drop_path_rate: float = 0.0  # Stochastic Depth (timm's drop_path_rate)
    disturb_label: float = 0.0  # DisturbLabel: replace a training label by a random class with this probability
    # optimisation
    epochs: int | None = None
    iters: int | None = None
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float | None = None  # None: the method's default
    schedule: str = "step"
    decay_at: int | None = None  # step (exp: reaches) lr / 10 after this many steps; None: 2/3 of training
    lr_cycles: int = 3  # cycles of the cyclic schedules (cosine-restarts, triangular)
    lr_min_factor: float = 0.0  # lowest lr of the cyclic schedules, as a fraction of --lr
    seed: int = 0
    # precision and DDP (change the result): autocast dtype; under torchrun, global-batch BatchNorm
    amp: str = "none"
    sync_bn: bool = False
    # execution (does not change the result, apart from floating-point noise across devices)
    device: str = "auto"
    channels_last: bool | None = None  # None: deltatl.run.use_channels_last (on for CPU and CUDA)
    compile: bool = False
    workers: int | None = None  # None: deltatl.run.data_workers (0 on the CPU, up to 8 processes on CUDA)
    eval_every: int = 1
    out: str | None = None
    attention_cache: str | None = None  # default ~/.cache/deltatl/attention (deltatl.outputs.cache_dir)
    tensorboard: bool = False  # TensorBoard event files in the run directory

    DEFAULT_EPOCHS = 40  # the budget of README's measurements (the paper's: tens of epochs)

    def __post_init__(self) -> None:
        for name, low in (("image_size", 8), ("batch_size", 1), ("eval_every", 1), ("workers", 0)):
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise DeltatlError(f"`{name}` must be at least {low}")
        if self.epochs is not None and self.iters is not None:
            raise DeltatlError("give `epochs` or `iters`, not both")
        for name in ("epochs", "iters"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DeltatlError(f"`{name}` must be at least 1")
        if self.rifle < 0:
            raise DeltatlError("`rifle` must be >= 0")
        if self.delta_reduction not in DELTA_REDUCTIONS:
            raise DeltatlError(f"`delta_reduction` must be one of {', '.join(DELTA_REDUCTIONS)}")
        if self.delta_source_bn not in SOURCE_BN_MODES:
            raise DeltatlError(f"`delta_source_bn` must be one of {', '.join(SOURCE_BN_MODES)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise DeltatlError(f"`{f.name}` must be a finite number, got {value}")
        for name in ("alpha", "beta", "weight_decay"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise DeltatlError(f"`{name}` must be a finite number >= 0")
        if not 0 <= self.momentum < 1:
            raise DeltatlError("`momentum` must be in [0, 1)")
        if self.attention_temperature <= 0:
            raise DeltatlError("`attention_temperature` must be positive")
        if self.amp not in ("none", "bf16", "fp16"):
            raise DeltatlError("`amp` must be none, bf16 or fp16")
        if self.attention_method not in ("exact", "first_order", "naive"):
            raise DeltatlError("`attention_method` must be exact, first_order or naive")
        if self.lr <= 0:
            raise DeltatlError("`lr` must be positive")
        for name, low, high in (("head_dropout", 0, 1), ("head_dropconnect", 0, 1), ("drop_path_rate", 0, 1),
                                ("lr_min_factor", 0, 1)):
            if not low <= getattr(self, name) < high:
                raise DeltatlError(f"`{name}` must be in [{low}, {high})")
        if not 0 <= self.disturb_label <= 1:
            raise DeltatlError("`disturb_label` must be in [0, 1]")
        if self.aux_weight < 0:
            raise DeltatlError("`aux_weight` must be >= 0")
        if self.aux_weight and self.image_size < 299:
            # Inception-V3's auxiliary classifier needs the 17x17 Mixed_6e map of a 299-pixel input
            raise DeltatlError("`aux_weight` needs `image_size` 299 or more (Inception-V3's auxiliary classifier)")
        if self.lr_cycles < 1:
            raise DeltatlError("`lr_cycles` must be at least 1")
        if self.decay_at is not None and self.decay_at < 1:
            raise DeltatlError("`decay_at` must be at least 1")
        if not 0 <= self.val_fraction < 1:
            raise DeltatlError("`val_fraction` must be in [0, 1)")
        if self.train_per_class is not None and self.train_per_class < 0:
            raise DeltatlError("`train_per_class` must be positive (0 = all images)")
        if (self.cv_folds is None) != (self.cv_fold is None) or (
                self.cv_folds is not None and not 0 <= self.cv_fold < self.cv_folds):  # type: ignore[operator]
            raise DeltatlError("cv_folds and cv_fold go together, with 0 <= cv_fold < cv_folds")

    def attention_settings(self) -> "AttentionSettings":
        """The ``--attention-*`` settings of the official procedure, for :mod:`deltatl.attention`."""
        from .attention import AttentionSettings

        return AttentionSettings(self.attention_epochs, self.attention_lr, self.attention_batches,
                                 self.attention_batch_size, self.attention_bn_train, self.attention_method)

    def resolved_alpha(self) -> float | None:
        """``--alpha``, or the default of the method and reduction; None for methods without alpha."""
        if not get_method(self.method).uses("alpha"):
            return None
        if self.alpha is not None:
            return self.alpha
        return default_alpha(self.method, self.delta_reduction, self.model)[0]

    def result_fields(self) -> dict[str, Any]:
        """The fields that define what a run computes (compared when a run directory is reused): the
        execution settings and those the method does not use are left out, alpha is resolved."""
        skip = {"device", "workers", "out", "fine_tuned", "attention_cache", "channels_last", "compile", "tensorboard",
                "l2sp_fused"}
        if not self.rifle:  # RIFLE's switches do nothing without re-initialisations
            skip |= {"rifle_reset_momentum", "rifle_cyclic_lr"}
        try:
            method: Method | None = get_method(self.method)  # a composition (delta+bss) too
        except DeltatlError:
            method = None
        if method is not None:
            if not method.uses("alpha"):
                skip |= {"alpha"}
            if not method.uses("beta"):
                skip |= {"beta"}
            if not method.feature_maps:
                skip |= {f.name for f in fields(self) if f.name.startswith("delta_")}
            if not method.attention:  # LP-FT's probe is the attention's L2-FE fit: it keeps its settings
                probe = {"attention_epochs", "attention_lr", "attention_batch_size", "attention_bn_train"}
                skip |= {f.name for f in fields(self) if f.name.startswith("attention_")
                         and not (method.linear_probe and f.name in probe)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        if "alpha" in values and method is not None:
            values["alpha"] = self.resolved_alpha()
        if self.epochs is None and self.iters is None:  # what the run trains, not "the default of its day"
            values["epochs"] = self.DEFAULT_EPOCHS
        return values


# alpha when --alpha is not given: the authors' 0.01 (ResNet-101, 224 px, batch 64), except where deltatl
# measured a better one. The official summed term's scale depends on the model, the image size and the
# batch size, so its calibration holds for the embedded default (EfficientNet-Lite0, 96 px, batch 32):
# 5-fold cross-validation at the paper's budget (README, "DELTA's defaults"; evidence/fm30.sh, stage
# search-delta) chose 0.001 for DELTA and the authors' 0.01 for delta-noatt. The "relative" term has a
# scale of its own.
OFFICIAL_ALPHA = 0.01
EMBEDDED_DELTA_ALPHA = 0.001
RELATIVE_ALPHA = 0.01


def default_alpha(method: str, reduction: str, model: str = EMBEDDED_MODEL) -> tuple[float, str]:
    """The default alpha of ``method`` with DELTA's ``reduction`` on ``model``, and where it comes from."""
    if get_method(method).feature_maps:
        if reduction == "relative":
            return RELATIVE_ALPHA, ("deltatl's default for --delta-reduction relative, chosen on the embedded "
                                    "default's validation split (README)")
        if reduction == "sum" and model == EMBEDDED_MODEL and get_method(method).attention:
            return EMBEDDED_DELTA_ALPHA, ("deltatl's calibration of the official term for the embedded "
                                          "EfficientNet-Lite0 at batch 32, chosen by 5-fold cross-validation (README)")
    own = get_method(method).default_alpha
    if own is not None:
        return own, f"the default of {method}'s authors"
    return OFFICIAL_ALPHA, "the authors' default (tuned for ResNet-101, 224 px, batch 64)"


_TYPES = {f.name: str(f.type) for f in fields(TrainConfig)}


def load_yaml(path: str, _including: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping of config keys (``-`` or ``_`` both accepted); unknown keys are an error.

    ``base: other.yaml`` (or a list of files; paths relative to this file) includes other config files
    first: the bases are merged in order, then this file's own keys override them. Bases may have
    bases of their own (the presets under ``configs/`` use this); a cycle is an error.
    """
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
    bases = values.pop("base", None)
    unknown = sorted(set(values) - set(_TYPES))
    if unknown:
        raise DeltatlError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    if bases is None:
        return values
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise DeltatlError(f"{path}: base must be a file name or a list of file names")
    chain = (*_including, os.path.abspath(path))
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = os.path.join(os.path.dirname(path), base)
        if os.path.abspath(base_path) in chain:
            raise DeltatlError(f"{path}: base {base} includes itself")
        merged.update(load_yaml(base_path, chain))
    return {**merged, **values}


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


def parse_grid_values(flag: str, items: Sequence[str]) -> tuple[float, ...]:
    """``["1e-4", "0.001,0.01"]`` -> ``(1e-4, 0.001, 0.01)``; a bad, negative or repeated value is an error."""
    values: list[float] = []
    for text in (t for item in items for t in item.split(",") if t.strip()):
        try:
            value = float(text)
        except ValueError:
            raise DeltatlError(f"{flag}: '{text}' is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise DeltatlError(f"{flag}: {text} must be a finite number >= 0")
        if value in values:
            raise DeltatlError(f"{flag}: {text} is given twice")
        values.append(value)
    return tuple(values)


def make_config(file_values: dict[str, Any], cli_values: dict[str, Any]) -> TrainConfig:
    """Defaults, then the file, then the flags given on the command line."""
    values = {k: _coerce(k, v) for k, v in {**file_values, **cli_values}.items()}
    return TrainConfig(**values)


def dump_yaml(config: TrainConfig, path: str) -> None:
    with atomic_open(path) as f:
        yaml.safe_dump(config.result_fields(), f, sort_keys=False)


def read_run_config(path: str) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f) or {}
