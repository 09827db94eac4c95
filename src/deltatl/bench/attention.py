"""Channel-attention section of ``deltatl bench``: the exact batched path and the
first-order approximation of :func:`deltatl.attention.channel_attention_scores` against the naive
one-forward-per-channel loop, on ``--model`` (default: the embedded EfficientNet-Lite0).

What it does, with the methods interleaved round by round (the order rotates each round) so that
machine noise hits them alike; times are medians over ``--attention-repeats`` rounds, speed-ups
medians of the per-round ratios:

1. Builds the model with its source weights and a new head, and trains the head as L2-FE on
   ``--data`` (default Fashion-MNIST-30) with :func:`deltatl.engine.fit.fit`, as
   ``deltatl.attention.estimate_channel_attention`` does (backbone frozen, BatchNorm
   statistics adapting, SGD lr 0.01, momentum 0.9, wd 1e-4, lr / 10 after 60 % of the steps), but for
   ``--head-epochs`` epochs (default 5) instead of the official 10.
2. Takes the first ``--attention-batches`` training batches of epoch 0 with the train augmentation
   (the batches the library itself scores).
3. For each layer of ``--attention-layers`` (default: the model's preset; one JSON line each) and in
   total (one line):

   - ``naive``: one forward per channel, timed on ``--naive-channels`` sampled channels and
     extrapolated: ``plain forward + C * (time per channel)``, which is what the library's naive loop
     does. Layers with at most ``--naive-full-max`` channels also run the library's
     ``method="naive"`` in full once (``naive_full_s``);
   - ``exact`` and ``first_order``: ``channel_attention_scores`` on that layer alone; each call
     includes the plain forward and, for exact, the search for the expansion point (also timed alone,
     ``exact_search_s``). The total of first_order is one call for all layers;
   - agreement: max |exact - naive| on the sampled channels, Spearman rank correlation and top-10 %
     overlap of first_order vs exact, and the L1 distance between the DELTA weights
     (softmax(z / 5)) computed from either;
   - the floor of the exact path: the fraction of a forward that runs after the layer (and after the
     expansion point the library chose), from timestamps taken inside plain forwards, and from FLOP
     counts (``torch.utils.flop_counter``: convolutions and matmuls).

4. Times the exact path on ``--sweep-layers`` for several ``--sweep-masks`` values of
   ``masks_per_forward`` (one line each).

JSON lines of ``"section": "attention"`` with ``"kind"``: ``layer``, ``total``, ``masks_per_forward``.
See BENCHMARKS.md for the commands and how to read the numbers.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..attention.scores import (_batch_loss, _expansion_point, _forward_with_hook, channel_attention_scores,
                                normalize_scores)
from ..config import TrainConfig
from ..data import TransformedImages
from ..data.transforms import eval_transform, train_transform
from ..attention.estimate import scoring_batches
from ..engine.fit import epoch_steps, fit
from ..engine.objective import Objective
from ..errors import DeltatlError
from ..features import layer_preset
from ..models import create_model, preprocessing
from ..run import open_splits
from .common import Bench, interleaved, log, median, spearman, synchronize, timed
from .training import default_pretrained


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (prefix timing)."""


def _raise_stop(*_args: Any) -> None:
    raise _Stop


def prefix_forward(model: nn.Module, images: Tensor, module: nn.Module, before: bool) -> None:
    """Run ``model`` up to the input (``before``) or the output of ``module``, then stop."""
    handle = (module.register_forward_pre_hook(_raise_stop) if before
              else module.register_forward_hook(_raise_stop))
    try:
        model(images)
    except _Stop:
        pass
    finally:
        handle.remove()


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        try:
            fn()
        except _Stop:
            pass
    return counter.get_total_flops()


def largest_replicated_bytes(model: nn.Module, images: Tensor, layer: nn.Module, expand_at: nn.Module | None) -> int:
    """Bytes of the largest module output computed after the expansion point in a plain forward of B
    samples; the exact path holds that tensor times ``masks_per_forward``."""
    state = {"after": False, "largest": 0}

    def start(*_args: Any) -> None:
        state["after"] = True

    def record(_module: nn.Module, _args: Any, output: Any) -> None:
        if state["after"] and isinstance(output, Tensor):
            state["largest"] = max(state["largest"], output.numel() * output.element_size())

    handles = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
    handles.append(expand_at.register_forward_pre_hook(start) if expand_at is not None
                   else layer.register_forward_hook(start))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return state["largest"]


# --- setup ----------------------------------------------------------------------------------------

def build_l2fe_model(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, list, dict[str, Any]]:
    """The model with an L2-FE head, and the first ``args.attention_batches`` augmented training batches."""
    config = TrainConfig(model=args.model, image_size=args.image_size, seed=args.seed, device=str(device),
                         data=args.data, data_root=args.data_root, train_per_class=args.train_per_class)
    splits = open_splits(config, progress=False)
    torch.manual_seed(args.seed)
    model = create_model(config.model, len(splits.classes), pretrained=default_pretrained(args.model, args.pretrained))
    pre = preprocessing(model)
    train = TransformedImages(splits.train, train_transform(args.image_size, pre), seed=args.seed)
    val = TransformedImages(splits.val, eval_transform(args.image_size, pre))
    # As estimate_channel_attention: backbone frozen, BatchNorm statistics adapting (bn_train=True).
    objective = Objective(model, "l2-fe", freeze_bn=False)
    steps = args.head_epochs * epoch_steps(len(train), args.batch_size)
    log(f"L2-FE head: {args.head_epochs} epochs = {steps} SGD steps on {len(train)} training images")
    with tempfile.TemporaryDirectory() as run_dir:
        seconds, summary = timed(device, lambda: fit(
            objective, train, val, None, run_dir=run_dir, total_steps=steps, batch_size=args.batch_size,
            lr=0.01, weight_decay=1e-4, schedule="step", decay_fraction=0.6, device=device, seed=args.seed,
            progress=False))
    head = {"head_epochs": args.head_epochs, "head_steps": steps, "train_images": len(train),
            "val_images": len(val), "head_val_top1": summary["val_top1"], "head_seconds": round(seconds, 1)}
    log(f"L2-FE head trained in {seconds:.0f} s, val top-1 {summary['val_top1']:.1f} %")
    batches = scoring_batches(train, args.batch_size, args.attention_batches, args.seed, device)
    if len(batches) < args.attention_batches or batches[-1][0].shape[0] != args.batch_size:
        raise DeltatlError(f"not enough training images for {args.attention_batches} batches of {args.batch_size}")
    return model.eval(), batches, head


# --- per-layer measurement ------------------------------------------------------------------------

def top_overlap(a: Tensor, b: Tensor, fraction: float = 0.1) -> float:
    k = max(1, math.ceil(fraction * a.numel()))
    top_a = set(torch.topk(a, k).indices.tolist())
    top_b = set(torch.topk(b, k).indices.tolist())
    return len(top_a & top_b) / k


def split_forward(model: nn.Module, images: Tensor, module: nn.Module, expand_at: nn.Module | None,
                  rounds: int, device: torch.device) -> dict[str, float]:
    """Where a plain forward spends its time: timestamps taken inside the same forward (at the input
    of the expansion point and at the layer's output), so the fractions do not depend on how loaded the
    machine is from one forward to the next. Medians over ``rounds`` forwards."""
    stamps: dict[str, float] = {}

    def mark(key: str) -> Callable[..., None]:
        def hook(*_args: Any) -> None:
            synchronize(device)
            stamps.setdefault(key, time.perf_counter())
        return hook

    handles = [module.register_forward_hook(mark("layer"))]
    handles.append(expand_at.register_forward_pre_hook(mark("expansion")) if expand_at is not None
                   else module.register_forward_hook(mark("expansion")))
    forward, after_layer, after_expansion = [], [], []
    try:
        with torch.no_grad():
            for _ in range(rounds):
                stamps.clear()
                synchronize(device)
                start = time.perf_counter()
                model(images)
                synchronize(device)
                end = time.perf_counter()
                forward.append(end - start)
                after_layer.append((end - stamps["layer"]) / (end - start))
                after_expansion.append((end - stamps["expansion"]) / (end - start))
    finally:
        for handle in handles:
            handle.remove()
    return {"forward_s": median(forward), "suffix_time_fraction": median(after_layer),
            "suffix_from_expansion_time_fraction": median(after_expansion)}


def measure_layer(args: argparse.Namespace, model: nn.Module, name: str, batches: list, losses0: list[Tensor],
                  plain_s: float, device: torch.device, rng: np.random.Generator) -> dict[str, Any]:
    modules = dict(model.named_modules())
    names = {module: key for key, module in modules.items()}
    module = modules[name]
    images0, labels0 = batches[0]
    with torch.no_grad():
        expand_at = _expansion_point(model, name, images0, labels0, losses0[0])
        channels = _channels(model, module, images0[:1])
    expansion_name = names[expand_at] if expand_at is not None else "(layer output)"
    sample = sorted(rng.choice(channels, size=min(args.naive_channels, channels), replace=False).tolist())

    def naive_sample() -> Tensor:
        # What the library's naive loop does for each channel (_naive_diffs), on the sampled channels.
        with torch.no_grad():
            diffs = torch.zeros(len(sample), dtype=torch.float64)
            for (images, labels), loss0 in zip(batches, losses0):
                for i, channel in enumerate(sample):
                    diffs[i] += (_batch_loss(_forward_with_hook(model, module, images, channel), labels) - loss0)[0]
            return diffs / len(batches)

    def exact() -> dict[str, Tensor]:
        return channel_attention_scores(model, [name], batches, method="exact",
                                        masks_per_forward=args.masks_per_forward, progress=False)

    def first_order() -> dict[str, Tensor]:
        return channel_attention_scores(model, [name], batches, method="first_order", progress=False)

    def search() -> None:
        with torch.no_grad():
            _expansion_point(model, name, images0, labels0, losses0[0])

    log(f"{name}: {channels} channels, expansion at {expansion_name}, timing naive on {len(sample)} channels, "
        f"exact, first_order ({args.attention_repeats} rounds)")
    times, results, usage = interleaved({"naive_sample": naive_sample, "exact": exact, "first_order": first_order,
                                         "search": search}, args.attention_repeats, device)
    exact_scores = results["exact"][name].double()
    fo_scores = results["first_order"][name].double()
    naive_scores = results["naive_sample"]

    # The naive loop, extrapolated: a plain forward per batch, then C forwards per batch. Speed-ups are
    # taken round by round (the methods of a round ran back to back) and the median reported.
    naive_rounds = [plain_s + channels * t / len(sample) for t in times["naive_sample"]]
    naive_s = median(naive_rounds)
    exact_s, fo_s = median(times["exact"]), median(times["first_order"])
    speedup_exact = median([n / e for n, e in zip(naive_rounds, times["exact"])])
    speedup_fo = median([n / f for n, f in zip(naive_rounds, times["first_order"])])

    # The floor of the exact path: which fraction of a forward comes after the layer (time and FLOPs).
    split = split_forward(model, images0, module, expand_at, max(5, args.attention_repeats), device)
    one = images0[:1]
    with torch.no_grad():
        flops_full = count_flops(lambda: model(one))
        flops_layer = count_flops(lambda: prefix_forward(model, one, module, before=False))
        flops_expand = (flops_layer if expand_at is None
                        else count_flops(lambda: prefix_forward(model, one, expand_at, before=True)))
    suffix = split["suffix_time_fraction"]
    suffix_expand = split["suffix_from_expansion_time_fraction"]
    # In units of one forward per batch: naive = 1 + C; the library's exact path, if every sample cost
    # the same in a replicated forward as in a plain one and the search were free, = 1 (plain) +
    # ceil(C / M) prefixes up to the expansion point + C suffixes from it; the floor = 1 + C * suffix.
    chunks = math.ceil(channels / args.masks_per_forward)
    model_units = 1 + chunks * (1 - suffix_expand) + channels * suffix_expand
    ideal_units = 1 + channels * suffix

    row: dict[str, Any] = {
        "kind": "layer", "layer": name, "channels": channels, "expansion_point": expansion_name,
        "naive_s": round(naive_s, 3), "naive_per_channel_s": round(median(times["naive_sample"]) / len(sample), 4),
        "naive_sampled_channels": len(sample),
        "exact_s": round(exact_s, 3), "exact_search_s": round(median(times["search"]), 3),
        "first_order_s": round(fo_s, 3),
        "speedup_exact": round(speedup_exact, 2), "speedup_first_order": round(speedup_fo, 1),
        "max_abs_exact_minus_naive": float((exact_scores[sample] - naive_scores).abs().max()),
        "max_abs_exact": float(exact_scores.abs().max()),
        "spearman_first_order": round(float(spearman(fo_scores.numpy(), exact_scores.numpy())), 4),
        "top10_overlap_first_order": round(top_overlap(fo_scores, exact_scores), 3),
        "weights_l1_first_order": round(float((normalize_scores({"l": fo_scores})["l"]
                                               - normalize_scores({"l": exact_scores})["l"]).abs().sum()), 4),
        "forward_s": round(split["forward_s"], 4),
        "suffix_time_fraction": round(suffix, 4),
        "suffix_flop_fraction": round(1 - flops_layer / flops_full, 4),
        "suffix_from_expansion_time_fraction": round(suffix_expand, 4),
        "suffix_from_expansion_flop_fraction": round(1 - flops_expand / flops_full, 4),
        "ideal_speedup_exact": round(1 / suffix, 2),
        "ideal_speedup_exact_flops": round(flops_full / (flops_full - flops_layer), 2),
        "model_speedup_exact": round((1 + channels) / model_units, 2),
        "exact_sys_s": usage["exact"]["sys_s"], "exact_minor_faults": usage["exact"]["minor_faults"],
        "naive_sample_minor_faults": usage["naive_sample"]["minor_faults"],
        "times": {k: [round(t, 4) for t in v] for k, v in times.items()},
    }
    if channels <= args.naive_full_max:
        log(f"{name}: full naive loop ({channels} forwards per batch)")
        seconds, full_naive = timed(device, lambda: channel_attention_scores(
            model, [name], batches, method="naive", progress=False))
        row["naive_full_s"] = round(seconds, 3)
        row["max_abs_exact_minus_naive_all_channels"] = float((exact_scores - full_naive[name].double()).abs().max())
    row["_scores"] = (exact_scores, fo_scores)
    row["_units"] = (model_units - 1, ideal_units - 1)  # without the plain forward, shared by all layers
    return row


def _channels(model: nn.Module, module: nn.Module, images: Tensor) -> int:
    shape: list[int] = []
    handle = module.register_forward_hook(lambda _m, _a, out: shape.append(out.shape[1]))
    try:
        model(images)
    finally:
        handle.remove()
    return shape[0]


def masks_sweep(args: argparse.Namespace, model: nn.Module, name: str, batches: list,
                device: torch.device, values: list[int]) -> list[dict[str, Any]]:
    modules = dict(model.named_modules())
    images0, labels0 = batches[0]
    with torch.no_grad():
        loss0 = _batch_loss(model(images0), labels0)
        expand_at = _expansion_point(model, name, images0, labels0, loss0)
        largest = largest_replicated_bytes(model, images0, modules[name], expand_at)
        channels = _channels(model, modules[name], images0[:1])
    covering = [m for m in values if m >= channels]
    values = [m for m in values if m < channels] + covering[:1]
    log(f"masks_per_forward sweep on {name}: {values}, and the naive loop on {args.naive_channels} channels "
        f"({args.sweep_repeats} rounds)")
    sample = list(range(min(args.naive_channels, channels)))

    def naive_sample() -> None:
        with torch.no_grad():
            for images, labels in batches:
                _batch_loss(model(images), labels)  # the naive loop's plain forward, counted once per batch
            for images, labels in batches:
                for channel in sample:
                    _batch_loss(_forward_with_hook(model, modules[name], images, channel), labels)

    tasks: dict[Any, Callable[[], Any]] = {
        m: (lambda m=m: channel_attention_scores(model, [name], batches, method="exact",
                                                 masks_per_forward=m, progress=False)[name].double())
        for m in values}
    tasks["naive"] = naive_sample
    times, results, usage = interleaved(tasks, args.sweep_repeats, device)
    # The task ran 1 + len(sample) forwards per batch; the naive loop runs 1 + C.
    naive_rounds = [t * (1 + channels) / (1 + len(sample)) for t in times["naive"]]
    reference = results[values[0]]
    fastest = min(median(times[m]) for m in values)
    rows = []
    for m in values:
        rows.append({"kind": "masks_per_forward", "layer": name, "channels": channels, "masks_per_forward": m,
                     "forwards_per_batch": math.ceil(channels / m), "exact_s": round(median(times[m]), 3),
                     "relative_to_fastest": round(median(times[m]) / fastest, 3),
                     "naive_s": round(median(naive_rounds), 3),
                     "speedup_vs_naive": round(median([n / e for n, e in zip(naive_rounds, times[m])]), 2),
                     "largest_replicated_activation_mb": round(largest * m / 2**20, 1),
                     "max_abs_diff_vs_first": float((results[m] - reference).abs().max()),
                     "sys_s": usage[m]["sys_s"], "minor_faults": usage[m]["minor_faults"],
                     "times": [round(t, 3) for t in times[m]], "naive_times": [round(t, 3) for t in times["naive"]]})
    return rows


def emit_total(args: argparse.Namespace, model: nn.Module, layers: list[str], batches: list,
               rows: list[dict[str, Any]], plain_s: float, device: torch.device,
               emit: Callable[[dict[str, Any]], None]) -> None:
    def plain() -> list[Tensor]:
        with torch.no_grad():
            return [model(images) for images, _ in batches]

    log(f"all layers at once: first_order and plain forward ({args.attention_repeats} rounds)")
    times, results, _ = interleaved({
        "first_order": lambda: channel_attention_scores(model, layers, batches, method="first_order",
                                                        progress=False),
        "plain": plain,
    }, args.attention_repeats, device)
    fo_total = median(times["first_order"])
    naive_total = sum(r["naive_s"] for r in rows) - (len(rows) - 1) * plain_s  # one plain forward in all
    exact_total = sum(r["exact_s"] for r in rows)
    spearman_all = [r["spearman_first_order"] for r in rows]
    # In units of one forward per batch: naive = 1 + sum C; floor = 1 + sum C * suffix fraction.
    naive_units = 1 + sum(r["channels"] for r in rows)
    model_units = 1 + sum(r["_units"][0] for r in rows)
    ideal_units = 1 + sum(r["_units"][1] for r in rows)
    fo_consistent = max(float((results["first_order"][r["layer"]].double() - r["_scores"][1]).abs().max())
                        for r in rows)
    emit({"kind": "total", "layers": layers, "channels": sum(r["channels"] for r in rows),
          "naive_s": round(naive_total, 2), "exact_s": round(exact_total, 2),
          "exact_search_s": round(sum(r["exact_search_s"] for r in rows), 2),
          "first_order_s": round(fo_total, 3), "plain_forward_s": round(median(times["plain"]), 4),
          "first_order_in_forwards": round(fo_total / median(times["plain"]), 2),
          "speedup_exact": round(naive_total / exact_total, 2),
          "speedup_first_order": round(naive_total / fo_total, 1),
          "max_abs_exact_minus_naive": max(r["max_abs_exact_minus_naive"] for r in rows),
          "spearman_first_order_min": min(spearman_all), "spearman_first_order_mean": round(sum(spearman_all) / len(rows), 4),
          "top10_overlap_first_order_mean": round(sum(r["top10_overlap_first_order"] for r in rows) / len(rows), 3),
          "first_order_all_layers_vs_per_layer_max_abs": fo_consistent,
          "ideal_speedup_exact": round(naive_units / ideal_units, 2),
          "model_speedup_exact": round(naive_units / model_units, 2),
          "note": "exact_s and naive_s are sums over per-layer calls (naive counts one plain forward); "
                  "first_order_s is one call for all layers",
          "times": {k: [round(t, 4) for t in v] for k, v in times.items()}})


def _select(names: str, layers: list[str]) -> list[str]:
    """``all``, ``none``, or comma-separated layer names / ``first`` / ``last`` of the preset."""
    if names.strip() in ("all", ""):
        return list(layers) if names.strip() == "all" else []
    if names.strip() == "none":
        return []
    chosen = [{"first": layers[0], "last": layers[-1]}.get(n.strip(), n.strip()) for n in names.split(",") if n.strip()]
    return list(dict.fromkeys(chosen))


def run_attention(bench: Bench) -> None:
    """The section: per-layer comparison, total, and the masks_per_forward sweep."""
    args, device = bench.args, bench.device
    model, batches, head = build_l2fe_model(args, device)
    preset = layer_preset(model, args.model, input_size=(3, args.image_size, args.image_size))
    layers = _select(args.attention_layers, preset)
    rng = np.random.default_rng(args.seed)
    setup = {"model": args.model, "pretrained": default_pretrained(args.model, args.pretrained),
             "data": args.data, "image_size": args.image_size, "batch_size": args.batch_size,
             "batches": args.attention_batches, "masks_per_forward": args.masks_per_forward,
             "repeats": args.attention_repeats, "seed": args.seed, **head}

    def plain() -> list[Tensor]:
        with torch.no_grad():
            return [model(images) for images, _ in batches]

    def emit(row: dict[str, Any]) -> None:
        bench.emit("attention", row, setup)

    losses0 = [_batch_loss(logits, labels) for logits, (_, labels) in zip(plain(), batches)]
    plain_times, _, _ = interleaved({"plain": plain}, 3, device)
    plain_s = median(plain_times["plain"])  # plain forwards of all batches

    rows = []
    for name in layers:
        row = measure_layer(args, model, name, batches, losses0, plain_s, device, rng)
        rows.append(row)
        emit({k: v for k, v in row.items() if not k.startswith("_")})
    if rows:
        emit_total(args, model, layers, batches, rows, plain_s, device, emit)
    values = sorted(int(v) for v in args.sweep_masks.split(",") if v.strip())
    for name in _select(args.sweep_layers, preset) if values else []:
        for row in masks_sweep(args, model, name, batches, device, values):
            emit(row)
