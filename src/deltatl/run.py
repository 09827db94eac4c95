"""From a :class:`~deltatl.config.TrainConfig` to a finished run directory.

This is the edge where configuration becomes explicit arguments for the library: datasets, model,
objective and :func:`~deltatl.engine.fit.fit`. The CLI, ``deltatl demo`` and the searches call
:func:`train_run`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from .config import TrainConfig, default_alpha, dump_yaml, read_run_config
from .data import DATASETS, DataSplits, TransformedImages, load_splits
from .attention import (cache_key, cached_channel_attention, check_replaceable_scores, estimate_channel_attention,
                        fit_linear_probe, layer_channels, normalize_scores, read_scores, write_scores)
from .data.folds import fold_splits
from .data.transforms import evaluation_transform, train_transform
from .distributed import SINGLE, DistEnv, init_from_env
from .engine import checkpoint as ckpt
from .engine.evaluate import evaluate
from .engine.fit import CHECKPOINT, METRICS, SUMMARY, epoch_steps, fit
from .engine.objective import Objective
from .engine.rifle import Rifle, RifleWarning, rifle_steps, rifle_warnings
from .engine.schedule import CYCLIC, step_decay_at
from .engine.tricks import DisturbLabel, check_stochastic_depth, install_head_regularization, suspended
from .engine.stochnorm import convert_stochnorm
from .engine.weight_ensemble import choose_mixing
from .errors import DeltatlError, RunInUse
from .features import layer_preset
from .methods import fine_tuning_of, get_method
from .outputs import atomic_open
from .regularizers import REGULARIZERS, source_relationship
from .models import create_model, head_module, head_name, preprocessing, resolve_pretrained

# Few-shot default of a named dataset when --train-per-class is not given (the embedded default job).
DEFAULT_TRAIN_PER_CLASS = {"fashion-mnist": 30}
CONFIG_FILE = "config.yaml"


def data_workers(requested: int | None, device: torch.device, processes_per_node: int = 1) -> int:
    """DataLoader worker processes: ``--workers`` if given; else none on the CPU (there the workers take
    the cores the step needs: BENCHMARKS.md, "Data loading") and ``min(8, usable CPUs per process)`` on
    CUDA, where a step takes milliseconds and loading in the training process would leave the GPU idle."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, usable // max(1, processes_per_node)))


def use_channels_last(requested: bool | None, device: torch.device) -> bool:
    """The memory format: ``--channels-last`` / ``--no-channels-last`` if given; else channels-last on
    the CPU and CUDA. On this project's 2-core CPU it trained EfficientNet-Lite0 1.5x faster at 96 and
    224 px, batch 32 (BENCHMARKS.md, "Throughput"); on CUDA it is what convolutions with tensor cores
    want (PyTorch's guidance; not measured here). MPS stays on the default format (not measured). The
    choice changes floating-point rounding only, so it is an execution setting, not part of a run's
    identity."""
    if requested is not None:
        return requested
    return device.type in ("cpu", "cuda")


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
        raise DeltatlError("`device` cuda requested but no CUDA device is available")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeltatlError("`device` mps requested but this PyTorch has no MPS device (Apple silicon only)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeltatlError(f"`device` {name}: deltatl runs on cpu, cuda, cuda:N or mps")
    return device


def default_out(config: TrainConfig) -> str:
    data = os.path.basename(os.path.normpath(config.data)) if config.data not in DATASETS else config.data
    return os.path.join("runs", f"{config.method}_{data}_{config.model.replace('/', '-')}_seed{config.seed}")


def train_per_class(config: TrainConfig) -> int | None:
    if config.train_per_class is None:
        return DEFAULT_TRAIN_PER_CLASS.get(config.data)
    return config.train_per_class or None  # 0 means all


def open_splits(config: TrainConfig, progress: bool = True) -> DataSplits:
    splits = load_splits(config.data, config.data_root, train_per_class=train_per_class(config),
                         val_per_class=config.val_per_class, val_fraction=config.val_fraction,
                         test_per_class=config.test_per_class, seed=config.seed, check_images=config.check_images,
                         progress=progress)
    if config.cv_folds is not None:  # a cross-validation run of `deltatl search`: one fold validates
        splits = fold_splits(splits, config.cv_folds, config.cv_fold, seed=config.seed)  # type: ignore[arg-type]
    return splits


def lock_run_dir(run_dir: str) -> Any:
    """An exclusive lock on ``run_dir/.lock``: two processes never train into one run directory.

    The lock is released when the returned file is closed or the process ends (even if killed).
    """
    handle = open(os.path.join(run_dir, ".lock"), "w")
    try:
        import fcntl

        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # not POSIX: no locking
        pass
    except OSError:
        handle.close()
        raise RunInUse(f"another deltatl process is using {run_dir}") from None
    return handle


def seeded_model(config: TrainConfig, num_classes: int) -> torch.nn.Module:
    """The starting point (source weights + new head) drawn from ``--seed``, not from the global RNG,
    so that the same command gives the same run and cached attention stays valid."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = create_model(config.model, num_classes, pretrained=config.pretrained,
                             checkpoint=config.checkpoint, head_init=config.head_init,
                             drop_path_rate=config.drop_path_rate, aux_head=config.aux_weight > 0)
    # RIFLE's comparison tricks (off by default; see deltatl.engine.tricks)
    check_stochastic_depth(model, config.model, config.drop_path_rate)
    install_head_regularization(model, head_name(model), dropout=config.head_dropout,
                                dropconnect=config.head_dropconnect)
    return model


def decay_fraction(config: TrainConfig, total_steps: int) -> float:
    """Where ``step`` divides the lr by 10 (``exp``: reaches /10): ``--decay-at`` steps, else 2/3 of
    training. ``round(decay_at / total * total)`` is ``decay_at`` exactly (one rounding of a ratio)."""
    if config.decay_at is None:
        return 2 / 3
    if config.decay_at > total_steps:
        raise DeltatlError(f"`decay_at` {config.decay_at} is beyond the {total_steps} training steps")
    return config.decay_at / total_steps


def _prepare_run_dir(run_dir: str, config: TrainConfig, resume: bool) -> dict[str, Any] | None:
    """Refuse to mix two runs in one folder; return the summary if this exact run already finished."""
    if os.path.isfile(os.path.join(run_dir, ".lock")):
        lock_run_dir(run_dir).close()  # raises if another process is training into the folder now
    config_path = os.path.join(run_dir, CONFIG_FILE)
    if os.path.isfile(config_path):
        previous = read_run_config(config_path)
        current = config.result_fields()
        defaults = dataclasses.asdict(TrainConfig())  # a setting added after the run was written: its default
        changed = sorted(k for k in current if previous.get(k, defaults.get(k)) != current[k])
        started = any(os.path.isfile(os.path.join(run_dir, f)) for f in (CHECKPOINT, SUMMARY))
        if changed and started:
            raise DeltatlError(f"{run_dir} holds a different run (differs in: {', '.join(changed)}); "
                               f"choose another `out`")
        summary_path = os.path.join(run_dir, SUMMARY)
        if changed:  # recorded, but stopped before training (e.g. a refused setting): start afresh
            return None
        if os.path.isfile(summary_path):
            with open(summary_path) as f:
                return json.load(f)
        if not resume and os.path.isfile(os.path.join(run_dir, CHECKPOINT)):
            raise DeltatlError(f"{run_dir} holds an unfinished run of this config; pass `resume` to continue it")
    elif os.path.isdir(run_dir) and [f for f in os.listdir(run_dir) if f != ".lock"]:
        raise DeltatlError(f"{run_dir} is not empty and holds no deltatl run; choose another `out`")
    return None


def train_run(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume, or reuse) the training run described by ``config``; return its summary."""
    method = get_method(config.method)
    run_dir = config.out or default_out(config)
    # Under torchrun: join the process group; rank 0 alone checks and writes the run directory.
    dist, device = init_from_env(resolve_device(config.device))
    progress = progress and dist.is_primary
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
    config = dataclasses.replace(config, workers=data_workers(config.workers, device, local_processes))
    finished = dist.on_rank0(lambda: _prepare_run_dir(run_dir, config, resume))
    if finished is not None:
        return {**finished, "reused": True}
    splits = open_splits(config, progress)
    if method.weight_ensemble:
        return weight_ensemble_run(config, splits, run_dir, resume=resume, progress=progress, dist=dist,
                                   device=device)
    if config.fine_tuned:
        raise DeltatlError(f"`fine_tuned` names the LP-FT run wise-ft interpolates; {config.method} has none")
    model = target_model(config, len(splits.classes))
    spe = epoch_steps(len(splits.train), config.batch_size * dist.world_size)  # --batch-size is per process
    total_steps = config.iters or (config.epochs or TrainConfig.DEFAULT_EPOCHS) * spe
    decay = decay_fraction(config, total_steps)
    rifle = None
    if config.rifle:  # checked before anything is written, so a refused count leaves --out free
        rifle = Rifle(head_module(model), rifle_steps(total_steps, config.rifle, None if config.iters else spe),
                      seed=config.seed, init=config.head_init, reset_momentum=config.rifle_reset_momentum,
                      cyclic_lr=config.rifle_cyclic_lr)
        decay_step = step_decay_at(total_steps, decay) if config.schedule == "step" else None
        for note in rifle_warnings(rifle.steps, total_steps, decay_step):
            if dist.is_primary:
                warnings.warn(note, RifleWarning, stacklevel=2)
    if config.schedule in CYCLIC and config.lr_cycles > total_steps:
        raise DeltatlError(f"`lr_cycles` {config.lr_cycles} is more than the {total_steps} training steps")
    disturb = DisturbLabel(config.disturb_label, len(splits.classes), config.seed) if config.disturb_label else None
    with claimed(run_dir, config, splits, dist):
        train_set, val_set, test_set = split_datasets(config, splits, model)
        probe = probe_head(config, model, train_set, run_dir, device, progress, dist) if method.linear_probe else None
        objective = build_objective(config, model, train_set, run_dir, device, progress, dist, probe=probe)
        return fit(objective, train_set, val_set, test_set, run_dir=run_dir,
                   total_steps=total_steps, batch_size=config.batch_size, lr=config.lr,
                   momentum=config.momentum,
                   weight_decay=method.weight_decay if config.weight_decay is None else config.weight_decay,
                   schedule=config.schedule, decay_fraction=decay, lr_cycles=config.lr_cycles,
                   lr_min_factor=config.lr_min_factor, device=device, seed=config.seed, num_workers=config.workers,
                   eval_every=config.eval_every, rifle=rifle, resume=resume, progress=progress,
                   run_info=run_info(config, splits), dist=dist, amp=config.amp,
                   channels_last=use_channels_last(config.channels_last, device), compile_model=config.compile,
                   sync_bn=config.sync_bn, disturb=disturb, tensorboard=config.tensorboard)


def target_model(config: TrainConfig, num_classes: int) -> torch.nn.Module:
    """The network that trains: :func:`seeded_model`, its BatchNorm layers StochNorm ones for ``stochnorm``."""
    model = seeded_model(config, num_classes)
    stochnorm = get_method(config.method).stochnorm
    if stochnorm is not None:
        if config.sync_bn:
            raise DeltatlError("stochnorm has no synchronised BatchNorm: run it without `sync_bn`")
        if not convert_stochnorm(model, stochnorm):
            raise DeltatlError(f"stochnorm replaces BatchNorm layers, and {config.model} has none")
    return model


@contextlib.contextmanager
def claimed(run_dir: str, config: TrainConfig, splits: DataSplits, dist: DistEnv) -> Iterator[None]:
    """Rank 0 holds ``run_dir`` for the block: its lock (no other process trains into it), its split lists
    (checked against those of a started run) and its config."""
    locks: list[Any] = []

    def record() -> None:
        os.makedirs(run_dir, exist_ok=True)
        locks.append(lock_run_dir(run_dir))
        lists_dir = os.path.join(run_dir, "splits")
        if os.path.isfile(os.path.join(run_dir, CHECKPOINT)):
            splits.check_lists(lists_dir)
        splits.write_lists(lists_dir)
        dump_yaml(config, os.path.join(run_dir, CONFIG_FILE))

    dist.on_rank0(record)
    try:
        yield
    finally:
        for lock in locks:
            lock.close()


def split_datasets(config: TrainConfig, splits: DataSplits, model: torch.nn.Module
                   ) -> tuple[TransformedImages, TransformedImages, TransformedImages]:
    """The training (augmented, seeded), validation and test images as ``model`` reads them."""
    pre = preprocessing(model)
    train_set = TransformedImages(splits.train,
                                  train_transform(config.image_size, pre, config.resize, config.keep_aspect),
                                  seed=config.seed)
    evaluation = evaluation_transform(config.image_size, pre, config.resize, config.keep_aspect, config.ten_crop)
    return train_set, TransformedImages(splits.val, evaluation), TransformedImages(splits.test, evaluation)


def run_info(config: TrainConfig, splits: DataSplits) -> dict[str, Any]:
    """What a run's checkpoint and summary record about it (``deltatl eval``, ``predict`` and the report read it)."""
    return {"method": config.method, "model": config.model, "data": config.data, "rifle": config.rifle,
            "alpha": config.resolved_alpha(), "alpha_from": alpha_origin(config),
            "classes": splits.classes, "config": config.result_fields()}


def weight_ensemble_run(config: TrainConfig, splits: DataSplits, run_dir: str, *, resume: bool, progress: bool,
                        dist: DistEnv, device: torch.device) -> dict[str, Any]:
    """WiSE-FT: an LP-FT run, then its weights interpolated with the probe's.

    The LP-FT run (the same config with ``lp-ft`` for ``wise-ft``) is ``config.fine_tuned`` when given
    (``deltatl compare`` passes its own LP-FT run of the seed: one fine-tuning for both methods), else
    the run's ``fine_tuned`` subfolder; it is trained, resumed or reused as any run. Then, on rank 0,
    :func:`finish_weight_ensemble` chooses the mixing on the validation split and scores the test split
    once with it.
    """
    if not len(splits.val):
        raise DeltatlError("wise-ft chooses its mixing coefficient on the validation split: give "
                           "`val_per_class` or `val_fraction`")
    if config.fine_tuned and os.path.abspath(config.fine_tuned) == os.path.abspath(run_dir):
        raise DeltatlError(f"`fine_tuned` is the LP-FT run to interpolate, not this run's own folder {run_dir}")
    with claimed(run_dir, config, splits, dist):
        fine_tuning = dataclasses.replace(config, method=fine_tuning_of(config.method), fine_tuned=None,
                                          out=config.fine_tuned or os.path.join(run_dir, "fine_tuned"))
        summary = train_run(fine_tuning, resume=resume, progress=progress)
        return dist.on_rank0(lambda: finish_weight_ensemble(config, fine_tuning, splits, summary, run_dir, device,
                                                            progress))


def finish_weight_ensemble(config: TrainConfig, fine_tuning: TrainConfig, splits: DataSplits,
                           summary: dict[str, Any], run_dir: str, device: torch.device,
                           progress: bool) -> dict[str, Any]:
    """WiSE-FT's last stage: theta(a) = (1 - a) theta_probe + a theta_ft with a chosen on the validation
    split, the test split scored once with it, the ensemble's weights in the run's checkpoint (what
    ``deltatl eval`` reads) and its summary. theta_probe is the LP-FT run's linear probe (finished there:
    reused), theta_ft its final weights. Its ``seconds`` are the LP-FT run's plus this stage's."""
    started = time.perf_counter()
    fit_dir = str(fine_tuning.out)
    model = target_model(config, len(splits.classes))
    train_set, val_set, test_set = split_datasets(config, splits, model)
    start = probe_head(fine_tuning, model, train_set, fit_dir, device, progress)
    state = ckpt.load(os.path.join(fit_dir, CHECKPOINT))
    model.load_state_dict(state["model"])
    model.to(device)

    def scores(dataset: TransformedImages, desc: str) -> dict[str, float]:
        return evaluate(model, dataset, batch_size=config.batch_size, device=device, num_workers=config.workers,
                        desc=desc, progress=progress)

    end = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mixing, val_top1 = choose_mixing(model, {k: v.to(device) for k, v in start.items()}, end,
                                     lambda m: scores(val_set, "val")["top1"])
    val, test = scores(val_set, "val"), scores(test_set, "test")
    info = run_info(config, splits)
    state["model"] = {k: v.cpu() for k, v in model.state_dict().items()}
    state["run_info"] = info
    ckpt.save_atomic(state, os.path.join(run_dir, CHECKPOINT))
    with open(os.path.join(fit_dir, METRICS)) as f, atomic_open(os.path.join(run_dir, METRICS)) as out:
        out.write(f.read())  # the fine-tuning's curves, for the report
    fine_tuned = {k: v for k, v in summary.items() if k not in info and k != "reused"}
    summary = {**fine_tuned, **info, "val_top1": val["top1"], "val_loss": val["loss"], "test_top1": test["top1"],
               "test_loss": test["loss"], "seconds": round(summary["seconds"] + time.perf_counter() - started, 2),
               "wise_ft": {"mixing": mixing, "val_top1": {f"{a:g}": v for a, v in val_top1.items()},
                           "fine_tuned": os.path.relpath(fit_dir, run_dir),
                           "fine_tuned_val_top1": summary["val_top1"]}}
    with atomic_open(os.path.join(run_dir, SUMMARY)) as f:
        json.dump(summary, f, indent=2, allow_nan=False)
    return summary


def attention_run(config: TrainConfig, output: str, *, progress: bool = True) -> dict[str, torch.Tensor]:
    """``deltatl attention``: the raw channel scores of ``config``'s data and model, written to ``output``.

    Uses and fills the same cache as ``train --method delta``; the L2-FE step works in ``config.out``.
    """
    check_replaceable_scores(output)  # before hours of work, not after
    device = resolve_device(config.device)
    config = dataclasses.replace(config, workers=data_workers(config.workers, device))
    splits = open_splits(config, progress)
    model = seeded_model(config, len(splits.classes))
    pre = preprocessing(model)
    train_set = TransformedImages(splits.train,
                                  train_transform(config.image_size, pre, config.resize, config.keep_aspect),
                                  seed=config.seed)
    layers = delta_layers(config, model)
    work_dir = config.out or os.path.join("runs", "attention")
    raw = channel_attention_scores_for(config, model, layers, train_set, work_dir, device, progress)
    write_scores(output, raw, {"model": config.model, "data": config.data, "layers": layers,
                               "method": config.attention_method})
    return raw


def delta_layers(config: TrainConfig, model: torch.nn.Module) -> list[str]:
    """The tapped layers: ``--delta-layers`` or the architecture's preset."""
    try:
        return list(config.delta_layers or layer_preset(model, config.model))
    except ValueError as exc:
        raise DeltatlError(str(exc)) from None


def weights_identity(config: TrainConfig) -> dict[str, Any]:
    """What identifies the source weights (for the attention cache key)."""
    source = resolve_pretrained(config.model, config.pretrained, config.checkpoint)
    if source == "checkpoint":
        stat = os.stat(config.checkpoint)
        return {"checkpoint": os.path.abspath(config.checkpoint), "size": stat.st_size, "mtime": stat.st_mtime}
    return {"weights": source}


def attention_key_fields(config: TrainConfig, layers: list[str]) -> dict[str, Any]:
    """Everything the raw attention scores depend on, apart from the training images."""
    fields = {"model": config.model, **weights_identity(config), "head_init": config.head_init,
              "layers": layers, "image_size": config.image_size, "resize": config.resize, "seed": config.seed,
              **config.attention_settings().key_fields()}
    # Settings added later enter the key only when set, so that existing cache entries stay valid.
    fields.update({k: v for k, v in (("keep_aspect", config.keep_aspect), ("aux_head", config.aux_weight > 0)) if v})
    return fields


def attention_fit_dir(run_dir: str, key: str) -> str:
    """Where the attention's L2-FE fit works (resumable; LP-FT with DELTA's attention shares it)."""
    return os.path.join(run_dir, "attention_fe", key)


def channel_attention_scores_for(config: TrainConfig, model: torch.nn.Module, layers: list[str],
                                 train_set: TransformedImages, run_dir: str, device: torch.device,
                                 progress: bool) -> dict[str, torch.Tensor]:
    """Raw attention scores: from ``--attention-file``, the cache, or the official procedure."""
    channels = layer_channels(model, layers, config.image_size)
    if config.attention_file:
        try:
            return read_scores(config.attention_file, layers, channels)
        except (OSError, ValueError) as exc:
            raise DeltatlError(f"`attention_file`: {exc}") from None
    settings = config.attention_settings()
    fields = attention_key_fields(config, layers)
    key = cache_key(fields, train_set.images)

    def compute() -> dict[str, torch.Tensor]:
        return estimate_channel_attention(
            model, layers, train_set, work_dir=attention_fit_dir(run_dir, key), device=device,
            seed=config.seed, settings=settings, num_workers=config.workers, progress=progress)

    # The attention is the source network's, not a regularized fine-tuning's: no comparison tricks.
    with suspended(model):
        return cached_channel_attention(config.attention_cache, key, layers,
                                        channels, compute, fields)


def probe_head(config: TrainConfig, model: torch.nn.Module, train_set: TransformedImages, run_dir: str,
               device: torch.device, progress: bool, dist: DistEnv = SINGLE) -> dict[str, torch.Tensor]:
    """LP-FT's first stage: the linear probe's whole state (WiSE-FT's start: with BatchNorm statistics
    adapted when the probe's were); :func:`build_objective` puts its head on ``model``, after the channel
    attention (which scores the pretrained network with a fresh head, as its cache key assumes).

    The probe is the L2-FE fit of the channel attention (its ``attention_*`` settings), on a copy of
    the model (whose backbone, BatchNorm statistics included, stays the pretrained one), run by rank 0
    in ``run_dir/linear_probe`` (resumable; reused once finished) and sent to every process. When the
    method also scores DELTA's attention (``lp-ft+delta``) the two are one fit: the probe works in the
    attention's folder, where the attention then finds it finished.
    """
    work_dir = os.path.join(run_dir, "linear_probe")
    if get_method(config.method).attention and not config.attention_file:
        layers = delta_layers(config, model)
        work_dir = attention_fit_dir(run_dir, cache_key(attention_key_fields(config, layers), train_set.images))

    def probe() -> dict[str, torch.Tensor]:
        fitted = fit_linear_probe(model, train_set, work_dir=work_dir, device=device,
                                  seed=config.seed, epochs=config.attention_epochs, lr=config.attention_lr,
                                  batch_size=config.attention_batch_size, bn_train=config.attention_bn_train,
                                  num_workers=config.workers, progress=progress)
        return {k: v.detach().cpu().clone() for k, v in fitted.state_dict().items()}

    with suspended(model):  # the comparison tricks belong to the fine-tuning, not to the probe
        return dist.on_rank0(probe)


def load_probed_head(model: torch.nn.Module, probe: dict[str, torch.Tensor]) -> None:
    """LP-FT: ``model``'s head, in place, from the probe's state (:func:`probe_head`)."""
    prefix = f"{head_name(model)}."
    head_module(model).load_state_dict({k.removeprefix(prefix): v for k, v in probe.items() if k.startswith(prefix)})


def co_tuning_relationship(config: TrainConfig, source_model: torch.nn.Module, train_set: TransformedImages,
                           device: torch.device) -> torch.Tensor:
    """Co-Tuning's p(y_source | y_target) on the training split (evaluation transform, one crop), on the CPU."""
    images = TransformedImages(train_set.images, evaluation_transform(config.image_size, preprocessing(source_model),
                                                                      config.resize, config.keep_aspect, False))
    loader = torch.utils.data.DataLoader(images, batch_size=config.batch_size, num_workers=config.workers)
    source_model.to(device)
    try:
        return source_relationship(source_model, ((x.to(device), y) for x, y in loader), len(train_set.images.classes))
    finally:
        source_model.cpu()


def alpha_origin(config: TrainConfig) -> str | None:
    """Where the run's alpha comes from (printed, and kept in the summary)."""
    if config.resolved_alpha() is None:
        return None
    return "--alpha" if config.alpha is not None else default_alpha(config.method, config.delta_reduction, config.model)[1]


def build_objective(config: TrainConfig, model: torch.nn.Module, train_set: TransformedImages, run_dir: str,
                    device: torch.device, progress: bool, dist: DistEnv = SINGLE,
                    probe: dict[str, torch.Tensor] | None = None) -> Objective:
    """The method's objective; for ``delta`` this computes (or reuses) the channel attention first, and
    only then (``probe``, LP-FT) starts the head from the linear probe's.

    Under DDP the attention is computed (or read) by rank 0 alone and sent to the other processes, and
    DELTA's summed term is scaled by the world size (DDP averages the processes' gradients).
    """
    method = get_method(config.method)
    layers = delta_layers(config, model) if method.feature_maps else None
    weights = None
    if method.attention:
        raw = dist.on_rank0(lambda: channel_attention_scores_for(config, model, layers, train_set, run_dir,
                                                                 device, progress))
        if dist.is_primary:
            write_scores(os.path.join(run_dir, "attention.json"), raw, {"layers": layers})
        weights = normalize_scores(raw, config.attention_temperature)
    if probe is not None:
        load_probed_head(model, probe)
    alpha = config.resolved_alpha()
    if alpha is not None and progress:
        print(f"alpha {alpha:g}: {alpha_origin(config)}", file=sys.stderr)
    source_model, term_options = None, {}
    regularizers = [REGULARIZERS[term.regularizer] for term in method.terms]
    if any(r.uses_source_head or r.reads_source_logits for r in regularizers):
        with torch.random.fork_rng(devices=[]):  # the pretrained network with its own classifier
            torch.manual_seed(config.seed)
            source_model = create_model(config.model, None, pretrained=config.pretrained, checkpoint=config.checkpoint)
    if method.has("co-tuning"):
        term_options["relationship"] = dist.on_rank0(
            lambda: co_tuning_relationship(config, source_model, train_set, device))
    return Objective(model, config.method, alpha=0.0 if alpha is None else alpha, beta=config.beta, layers=layers,
                     channel_weights=weights, reduction=config.delta_reduction, source_bn=config.delta_source_bn,
                     distance_scale=1.0 if config.delta_reduction == "mean" else dist.world_size,
                     energy_sum=dist.all_reduce_sum_ if dist.enabled else None,
                     batch_gather=dist.gather_batch if dist.enabled else None,
                     source_model=source_model, gradient_mean=dist.mean_gradient if dist.enabled else None,
                     term_options=term_options, l2sp_fused=config.l2sp_fused,
                     aux_weight=config.aux_weight)
