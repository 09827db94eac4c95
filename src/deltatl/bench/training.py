"""Training-step sections of ``deltatl bench``: step time per method against ``l2`` and the floor,
peak tensor memory per method, and how the step time grows with batch and image size.

Every step is :func:`deltatl.engine.fit.train_step`, the function ``fit()`` calls in its hot loop,
on an :class:`~deltatl.engine.objective.Objective` and SGD optimizer built with the settings
``deltatl train`` uses (:class:`~deltatl.config.TrainConfig` defaults: alpha = beta = 0.01, summed
DELTA term, lr 0.01, momentum 0.9, the method's weight decay). The batch is a fixed random tensor
already on the device: the sections time the step, not data loading (see the ``loader`` section).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..attention import layer_channels, normalize_scores
from ..config import TrainConfig
from ..engine.fit import make_optimizer, running_sums, train_step
from ..engine.objective import Objective
from ..features import layer_preset
from ..methods import get_method
from ..engine.stochnorm import convert_stochnorm
from ..models import EMBEDDED_MODEL, create_model, head_module
from .common import (Bench, calibrated, interleaved, log, median, per_call, resident_tensors, round_ratios,
                     spread, step_memory, tensor_bytes)

NUM_CLASSES = 10  # as Fashion-MNIST; the head's size hardly matters for speed
MB = 2 ** 20


def default_pretrained(model: str, pretrained: str | None) -> str:
    """Embedded weights where they exist, else random ones: timing does not depend on the weights,
    and the benchmark must not download anything."""
    if pretrained:
        return pretrained
    return "auto" if model == EMBEDDED_MODEL else "none"


@dataclass
class Trainer:
    """One method's objective, optimizer and gradient scaler, as ``fit()`` builds them."""

    method: str
    objective: Objective
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sums: dict[str, Tensor]

    def step(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        return train_step(self.objective, self.optimizer, self.scaler, images, labels, self.sums)

    def reset(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def resident(self) -> list[Tensor]:
        return resident_tensors([self.objective], self.optimizer)


class ModelSetup:
    """A model with a fresh head, its DELTA layers and (random, fixed) attention weights; builds one
    :class:`Trainer` per method from identical starting weights."""

    def __init__(self, name: str, pretrained: str, image_size: int, device: torch.device, seed: int,
                 channels_last: bool = False):
        self.name, self.device, self.channels_last = name, device, channels_last
        torch.manual_seed(seed)
        self.base = create_model(name, NUM_CLASSES, pretrained=pretrained)
        self.layers = layer_preset(self.base, name)  # as deltatl train (run.delta_layers)
        channels = layer_channels(self.base, self.layers, image_size)
        # DELTA with precomputed attention: the step does not depend on the values, only on their
        # existence; random scores through the library's own normalisation (softmax, T = 5).
        g = torch.Generator().manual_seed(seed)
        self.weights = normalize_scores({n: torch.randn(c, generator=g) for n, c in channels.items()})
        # LwF and Co-Tuning: the pretrained network with its own classifier, and a random relationship
        self.source_model = create_model(name, None, pretrained=pretrained)
        source_classes = head_module(self.source_model).out_features
        self.relationship = torch.softmax(torch.randn(NUM_CLASSES, source_classes, generator=g), dim=1)

    def trainer(self, method: str) -> Trainer:
        """The step of ``method``; ``l2-sp:fused`` is L2-SP with ``--l2sp-fused``."""
        method, _, variant = method.partition(":")
        d, spec = TrainConfig(method=method), get_method(method)
        model = copy.deepcopy(self.base)
        if spec.stochnorm is not None:
            convert_stochnorm(model, spec.stochnorm)
        objective = Objective(model, method, alpha=d.resolved_alpha() or 0.0, beta=d.beta,
                              layers=self.layers if spec.feature_maps else None,
                              channel_weights=self.weights if spec.attention else None,
                              reduction=d.delta_reduction, source_bn=d.delta_source_bn,
                              source_model=self.source_model, term_options={"relationship": self.relationship},
                              l2sp_fused=variant == "fused")
        objective.to(self.device)
        if self.channels_last:
            objective.to(memory_format=torch.channels_last)
        objective.train()
        optimizer = make_optimizer(objective, d.lr, d.momentum, spec.weight_decay)
        scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        return Trainer(method, objective, optimizer, scaler, running_sums(self.device))

    def source(self) -> nn.Module:
        """A frozen copy of the source network without DELTA's hooks (for a whole forward)."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return copy.deepcopy(self.base).eval().requires_grad_(False).to(self.device, memory_format=fmt)

    def batch(self, batch_size: int, image_size: int, seed: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(batch_size, 3, image_size, image_size, generator=g)
        labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return images.to(self.device, memory_format=fmt), labels.to(self.device)


def no_grad_forward(model: nn.Module, images: Tensor) -> Tensor:
    with torch.no_grad():
        return model(images)


class TrainingSections:
    """The ``step``, ``memory`` and ``scaling`` sections on ``--model``; trainers are built once and
    shared by the three (their weights drift a little between sections: irrelevant to speed)."""

    def __init__(self, bench: Bench):
        self.bench, self.args = bench, bench.args
        a = self.args
        log(f"building {a.model} ({default_pretrained(a.model, a.pretrained)} weights) for "
            f"{', '.join(a.methods)}")
        self.setup = ModelSetup(a.model, default_pretrained(a.model, a.pretrained), a.image_size, bench.device,
                                a.seed)
        self.trainers: dict[str, Trainer] = {}
        self.l2_step_s: float | None = None  # for the loader section

    def trainer(self, method: str) -> Trainer:
        if method not in self.trainers:
            self.trainers[method] = self.setup.trainer(method)
        return self.trainers[method]

    def common_setup(self) -> dict[str, Any]:
        a = self.args
        return {"model": a.model, "pretrained": default_pretrained(a.model, a.pretrained),
                "layers": self.setup.layers, "image_size": a.image_size, "batch_size": a.batch_size,
                "seed": a.seed}

    # --- step time ----------------------------------------------------------------------------

    def step(self) -> None:
        """Step time of each method relative to ``l2``, interleaved, next to the floor
        (l2 step + one no-grad source forward) / l2 step."""
        a, device = self.args, self.bench.device
        images, labels = self.setup.batch(a.batch_size, a.image_size, a.seed)
        trainers = {m: self.trainer(m) for m in a.methods}
        source = self.setup.source()
        # DELTA's own source forward stops after the last tapped layer (Objective.source_features).
        feature_method = next((m for m in a.methods if get_method(m.partition(":")[0]).feature_maps), "delta-noatt")
        truncated = self.trainer(feature_method).objective
        tasks: dict[str, Callable[[], Any]] = {m: (lambda t=t: t.step(images, labels)) for m, t in trainers.items()}
        tasks["source_forward"] = lambda: no_grad_forward(source, images)
        tasks["source_forward_truncated"] = lambda: truncated.source_features(images)
        log(f"step: {', '.join(tasks)}; {a.repeats} interleaved rounds")
        wrapped, calls = calibrated(tasks, a.min_sample_seconds, device)
        raw, _, _ = interleaved(wrapped, a.repeats, device)
        times = per_call(raw, calls)
        l2 = times["l2"]
        self.l2_step_s = median(l2)
        floor = round_ratios([t + s for t, s in zip(l2, times["source_forward"])], l2)
        floor_truncated = round_ratios([t + s for t, s in zip(l2, times["source_forward_truncated"])], l2)
        setup = {**self.common_setup(), "repeats": a.repeats, "min_sample_seconds": a.min_sample_seconds}
        floor_median = median(floor)
        self.bench.emit("step", {
            "kind": "floor", "train_step_ms": round(1e3 * median(l2), 3),
            "source_forward_ms": round(1e3 * median(times["source_forward"]), 3),
            "source_forward_truncated_ms": round(1e3 * median(times["source_forward_truncated"]), 3),
            "floor": round(floor_median, 4), "floor_spread": spread(floor),
            "floor_truncated": round(median(floor_truncated), 4),
            "calls_per_sample": {k: calls[k] for k in ("source_forward", "source_forward_truncated")},
            "times_ms": {k: [round(1e3 * t, 3) for t in times[k]]
                         for k in ("source_forward", "source_forward_truncated")},
        }, setup)
        for method in a.methods:
            ratios = round_ratios(times[method], l2)
            ratio = median(ratios)
            row: dict[str, Any] = {
                "kind": "step", "method": method, "step_ms": round(1e3 * median(times[method]), 3),
                "ratio_vs_l2": round(ratio, 4), "ratio_spread": spread(ratios), "floor": round(floor_median, 4),
                "calls_per_sample": calls[method], "times_ms": [round(1e3 * t, 3) for t in times[method]]}
            if get_method(method.partition(":")[0]).feature_maps:
                # How far DELTA's overhead is from the physical limit (1.0 = at the floor).
                row["ratio_over_floor"] = round(median(round_ratios(ratios, floor)), 4)
                row["overhead_over_floor_overhead"] = round((ratio - 1) / max(floor_median - 1, 1e-9), 3)
            self.bench.emit("step", row, setup)

    # --- memory -------------------------------------------------------------------------------

    def memory(self) -> None:
        """Peak tensor memory of a steady-state step of each method, relative to ``l2``, next to a
        floor: l2's peak plus what the method must hold (source weights and the source's tapped
        feature maps for DELTA, the starting point for L2-SP)."""
        a, device = self.args, self.bench.device
        images, labels = self.setup.batch(a.batch_size, a.image_size, a.seed)
        log(f"memory: {', '.join(a.methods)} (two steps each)")
        results: dict[str, dict[str, int]] = {}
        for method in a.methods:
            t = self.trainer(method)
            results[method] = step_memory(lambda: t.step(images, labels),
                                          lambda: [*t.resident(), images, labels], device, t.reset)
        l2 = results["l2"]
        # What a method cannot avoid holding on top of l2.
        musts: dict[str, int] = {}
        for method in a.methods:
            spec, obj = get_method(method.partition(":")[0]), self.trainer(method).objective
            must = 0
            if spec.starting_point:
                must += tensor_bytes(obj.l2sp.anchors())
            if spec.feature_maps:
                must += tensor_bytes([*obj.source.parameters(), *obj.source.buffers()])
                must += tensor_bytes(obj.source_features(images).values())
            musts[method] = must
        measure = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                   else "torch.profiler CPU allocator events (profile_memory)")
        setup = {**self.common_setup(), "measure": measure}
        for method, r in results.items():
            row: dict[str, Any] = {
                "kind": "memory", "method": method, "peak_mb": round(r["peak"] / MB, 2),
                "static_mb": round(r["static"] / MB, 2), "transient_mb": round(r["transient"] / MB, 2),
                "peak_ratio_vs_l2": round(r["peak"] / l2["peak"], 4),
                "transient_ratio_vs_l2": round(r["transient"] / max(l2["transient"], 1), 4),
                "must_hold_mb": round(musts[method] / MB, 2),
                "floor": round((l2["peak"] + musts[method]) / l2["peak"], 4),
            }
            row["ratio_over_floor"] = round(row["peak_ratio_vs_l2"] / row["floor"], 4)
            self.bench.emit("memory", row, setup)

    # --- scaling ------------------------------------------------------------------------------

    def scaling(self) -> None:
        """Step time against batch size (at ``--image-size``) and image size (at ``--batch-size``).

        All configurations and methods run in the same rounds (one step each per round, the order
        rotating), so the growth from one size to the next is a per-round ratio too, not a
        comparison of measurements taken minutes apart under different load.
        """
        a, device = self.args, self.bench.device
        methods = a.scaling_methods
        trainers = {m: self.trainer(m) for m in methods}
        configs = [("batch_size", b, a.image_size) for b in a.batch_sizes]
        configs += [("image_size", a.batch_size, s) for s in a.image_sizes]
        batches = {(b, s): self.setup.batch(b, s, a.seed) for _, b, s in configs}
        tasks: dict[tuple[int, int, str], Callable[[], Any]] = {
            (b, s, m): (lambda t=t, x=batches[(b, s)]: t.step(*x))
            for b, s in batches for m, t in trainers.items()}
        log(f"scaling: batch sizes {a.batch_sizes} at {a.image_size} px, image sizes {a.image_sizes} at batch "
            f"{a.batch_size}; {', '.join(methods)}; {len(tasks)} tasks interleaved, {a.scaling_repeats} rounds")
        wrapped, calls = calibrated(tasks, a.min_sample_seconds, device)
        raw, _, _ = interleaved(wrapped, a.scaling_repeats, device)
        times = per_call(raw, calls)
        setup = {**self.common_setup(), "batch_sizes": a.batch_sizes, "image_sizes": a.image_sizes,
                 "repeats": a.scaling_repeats}
        for axis, batch_size, image_size in configs:
            _, b0, s0 = next(c for c in configs if c[0] == axis)  # the first size of the axis
            work, work0 = batch_size * image_size ** 2, b0 * s0 ** 2
            for method in methods:
                values, first = times[(batch_size, image_size, method)], times[(b0, s0, method)]
                step_s = median(values)
                relative = median(round_ratios(values, first))
                row = {"kind": "scaling", "axis": axis, "method": method, "batch_size": batch_size,
                       "image_size": image_size, "step_ms": round(1e3 * step_s, 3),
                       "ms_per_image": round(1e3 * step_s / batch_size, 3),
                       "images_per_s": round(batch_size / step_s, 2),
                       "time_relative": round(relative, 4), "work_relative": round(work / work0, 4),
                       # 1.0 = time grows exactly like batch x pixels; below 1: better than linear.
                       "time_per_work_relative": round(relative / (work / work0), 4),
                       "calls_per_sample": calls[(batch_size, image_size, method)],
                       "times_ms": [round(1e3 * t, 3) for t in values]}
                if method != "l2" and "l2" in methods:
                    row["ratio_vs_l2"] = round(median(round_ratios(values, times[(batch_size, image_size, "l2")])), 4)
                self.bench.emit("scaling", row, setup)
