"""Throughput and data-loading sections of ``deltatl bench``.

``throughput``: images per second of training (an ``l2`` step through
:func:`deltatl.engine.fit.train_step`) and of inference (the forward ``evaluate()`` runs: eval mode,
``inference_mode``, autocast when bf16) for each model and image size, in float32 and bf16 autocast,
with and without channels_last, all variants of one model and size interleaved.

``loader``: one epoch of the training DataLoader exactly as ``fit()`` builds it (a new loader per
epoch, :class:`~deltatl.engine.fit.EpochSampler`, pinned memory on CUDA) over Fashion-MNIST-sized
images with the training augmentation, for several worker counts, next to the ``l2`` step time.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, Callable

import numpy as np
import torch

from ..data import ArrayImages, TransformedImages
from ..data.transforms import train_transform
from ..engine.fit import autocast_networks, train_loader
from ..models import IMAGENET
from .common import Bench, calibrated, interleaved, log, median, per_call, round_ratios, spread
from .training import ModelSetup, Trainer, default_pretrained

VARIANTS = ("fp32", "channels_last", "bf16", "bf16+channels_last")


def _variant(name: str) -> tuple[bool, torch.dtype | None]:
    """``(channels_last, autocast dtype)`` of a variant name."""
    parts = set(name.split("+"))
    return "channels_last" in parts, torch.bfloat16 if "bf16" in parts else None


def throughput(bench: Bench) -> None:
    a, device = bench.args, bench.device
    for model in a.throughput_models:
        for size in a.throughput_sizes:
            pretrained = default_pretrained(model, None)
            log(f"throughput: {model} ({pretrained} weights) at {size} px, batch {a.throughput_batch_size}: "
                f"{', '.join(a.throughput_variants)} x train/inference; {a.throughput_repeats} rounds")
            setups = {cl: ModelSetup(model, pretrained, size, device, a.seed, channels_last=cl)
                      for cl in sorted({_variant(v)[0] for v in a.throughput_variants})}
            trainers: dict[bool, Trainer] = {cl: s.trainer("l2") for cl, s in setups.items()}
            batches = {cl: s.batch(a.throughput_batch_size, size, a.seed) for cl, s in setups.items()}
            tasks: dict[tuple[str, str], Callable[[], Any]] = {}
            for variant in a.throughput_variants:
                cl, dtype = _variant(variant)
                tasks[(variant, "train")] = _train_task(trainers[cl], *batches[cl], device, dtype)
                tasks[(variant, "inference")] = _inference_task(trainers[cl], batches[cl][0], device, dtype)
            wrapped, calls = calibrated(tasks, a.min_sample_seconds, device)
            raw, _, _ = interleaved(wrapped, a.throughput_repeats, device)
            times = per_call(raw, calls)
            setup = {"model": model, "pretrained": pretrained, "image_size": size,
                     "batch_size": a.throughput_batch_size, "repeats": a.throughput_repeats, "method": "l2"}
            for (variant, mode), values in times.items():
                row: dict[str, Any] = {
                    "kind": "throughput", "model": model, "image_size": size, "variant": variant, "mode": mode,
                    "images_per_s": round(a.throughput_batch_size / median(values), 2),
                    "batch_ms": round(1e3 * median(values), 3), "calls_per_sample": calls[(variant, mode)],
                    "times_ms": [round(1e3 * t, 3) for t in values]}
                if ("fp32", mode) in times:
                    speedups = round_ratios(times[("fp32", mode)], values)
                    row["speedup_vs_fp32"] = round(median(speedups), 4)
                    row["speedup_spread"] = spread(speedups)
                bench.emit("throughput", row, setup)


def _train_task(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                dtype: torch.dtype | None) -> Callable[[], Any]:
    def run() -> Any:
        # fit() enters the same autocast wrapper (once per run; entering it per step costs nothing).
        with autocast_networks(trainer.objective, device.type, dtype) if dtype else nullcontext():
            return trainer.step(images, labels)
    return run


def _inference_task(trainer: Trainer, images: torch.Tensor, device: torch.device,
                    dtype: torch.dtype | None) -> Callable[[], Any]:
    model = trainer.objective.model

    def run() -> Any:
        # As evaluate(): eval mode, inference_mode, autocast around the forward.
        model.eval()
        try:
            with torch.inference_mode(), (torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()):
                return model(images)
        finally:
            model.train()
    return run


def loader(bench: Bench, l2_step_s: float | None) -> None:
    a, device = bench.args, bench.device
    n = a.batch_size * a.loader_batches
    rng = np.random.default_rng(a.seed)
    # Fashion-MNIST's shape: 28 x 28 grey uint8, resized and cropped to --image-size by the train
    # transform (decoding JPEG folders costs more per image than this in-memory array).
    images = ArrayImages(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).tolist(),
                         [str(i) for i in range(10)], "train")
    dataset = TransformedImages(images, train_transform(a.image_size, IMAGENET), seed=a.seed)

    kept = {w: train_loader(dataset, batch_size=a.batch_size, seed=a.seed, num_workers=w, device=device)
            for w in a.loader_workers if w > 0}

    def epoch(workers: int, keep: bool) -> dict[str, float]:
        # fit()'s loader, either new (new worker processes every epoch, as fit() did before) or the
        # one kept for the run (what fit() does now).
        start = time.perf_counter()
        loader_, move_to = kept[workers] if keep else train_loader(dataset, batch_size=a.batch_size, seed=a.seed,
                                                                   num_workers=workers, device=device)
        move_to(0, 0)
        first = None
        for x, y in loader_:
            x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if first is None:
                first = time.perf_counter() - start
        return {"first": first or 0.0}

    tasks = {(w, keep): (lambda w=w, keep=keep: epoch(w, keep))
             for w in a.loader_workers for keep in ((False, True) if w > 0 else (False,))}
    log(f"loader: one epoch of {a.loader_batches} batches of {a.batch_size} at {a.image_size} px with "
        f"workers {a.loader_workers} (new workers each epoch, and kept); {a.repeats} rounds")
    for fn in tasks.values():
        fn()  # warm-up (imports in the workers, page cache; starts the kept loaders' workers)
    times, results, _ = interleaved(tasks, a.repeats, device)
    kept.clear()
    setup = {"image_size": a.image_size, "batch_size": a.batch_size, "batches": a.loader_batches,
             "dataset": "uint8 28x28 grey in memory (Fashion-MNIST-like), train transform", "repeats": a.repeats,
             "pin_memory": device.type == "cuda"}
    for (workers, keep), values in times.items():
        epoch_s = median(values)
        row: dict[str, Any] = {"kind": "loader", "workers": workers, "kept": keep, "epoch_s": round(epoch_s, 4),
                               "per_batch_ms": round(1e3 * epoch_s / a.loader_batches, 3),
                               "first_batch_ms": round(1e3 * results[(workers, keep)]["first"], 3),
                               "times_s": [round(t, 4) for t in values]}
        if l2_step_s:
            # Share of an l2 step that loading one batch would add when not overlapped (workers = 0).
            row["l2_step_ms"] = round(1e3 * l2_step_s, 3)
            row["per_batch_over_l2_step"] = round(epoch_s / a.loader_batches / l2_step_s, 4)
        bench.emit("loader", row, setup)
