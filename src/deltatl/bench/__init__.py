"""``deltatl bench``: the benchmark suite. One command, JSON lines on stdout.

Sections (``--only``, comma-separated; default all, in this order):

- ``step``: the training step of each method (``l2``, ``l2-fe``, ``l2-sp``, ``delta-noatt``, ``delta``
  with precomputed attention weights) relative to ``l2`` on the same model, batch and input size,
  next to the floor (l2 step + one no-grad source forward) / l2 step;
- ``memory``: peak tensor memory of a step of each method relative to ``l2``, next to its floor;
- ``scaling``: step time of ``l2`` and ``delta`` against batch size and image size;
- ``throughput``: images/s of training and inference for EfficientNet-Lite0 (embedded weights) and
  ResNet-50 (random weights) at 96 and 224 px, float32 / bf16 autocast, with and without channels_last;
- ``loader``: one epoch of the training DataLoader as ``fit()`` builds it, for several worker counts;
- ``attention``: channel attention, exact and first_order against the naive loop (speed-up and
  agreement) after a short L2-FE fit on ``--data``.

Timing: every measured task is warmed up once, then all tasks of a measurement run once per round
with the order rotating each round, and ratios are medians of per-round ratios, so that load changes
on a shared machine cancel. Tasks shorter than ``--min-sample-seconds`` are repeated within a sample.
The steps are :func:`deltatl.engine.fit.train_step`, the code ``fit()`` runs, on objectives built as
``deltatl train`` builds them.

Every JSON line has ``section``, ``kind``, the measurement, ``setup`` (model, sizes, repeats),
``machine`` (CPU, cores, torch version, device, threads, load at start) and ``loadavg_1min``.
Progress goes to stderr. See BENCHMARKS.md for the commands and results.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from ..methods import METHODS

SECTIONS = ("step", "memory", "scaling", "throughput", "loader", "attention")
METHOD_NAMES = tuple(METHODS)
# lp-ft and wise-ft train with l2's step (their probe and interpolation are separate stages)
DEFAULT_METHODS = tuple(m for m in METHOD_NAMES if not (METHODS[m].linear_probe or METHODS[m].weight_ensemble))

# Options whose default depends on --quick: (full, quick). --quick is for development and CI: about
# a minute for all sections on a 2-core CPU with the default model; the full run takes much longer.
SIZED_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "repeats": (7, 3),
    "batch_size": (32, 16),
    "min_sample_seconds": (0.5, 0.2),
    "batch_sizes": ("8,16,32,64", "8,16"),
    "image_sizes": ("64,96,128,160,224", "64,96"),
    "scaling_repeats": (3, 2),
    "throughput_models": ("tf_efficientnet_lite0,resnet50", "tf_efficientnet_lite0"),
    "throughput_sizes": ("96,224", "96"),
    "throughput_batch_size": (8, 4),
    "throughput_repeats": (3, 2),
    "loader_workers": ("0,1,2", "0,2"),
    "loader_batches": (9, 3),
    "attention_repeats": (3, 1),
    "head_epochs": (5, 1),
    "attention_layers": ("all", "last"),
    "naive_channels": (6, 2),
    "sweep_masks": ("16,32,64,128", ""),
}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``deltatl bench`` (sized options default to None and are filled by :func:`resolve`)."""
    sized = "(default {0}; --quick: {1})"

    def help_of(name: str, text: str) -> str:
        full, quick = SIZED_DEFAULTS[name]
        return f"{text} {sized.format(full if full != '' else 'none', quick if quick != '' else 'none')}"

    g = parser.add_argument_group("what to run")
    g.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections among {', '.join(SECTIONS)} (default all)")
    g.add_argument("--quick", action="store_true", help="small sizes and few repeats (about a minute on 2 cores)")
    g.add_argument("--repeats", type=int, help=help_of("repeats", "interleaved rounds of step and loader"))
    g.add_argument("--min-sample-seconds", type=float,
                   help=help_of("min_sample_seconds", "repeat short tasks within one timed sample up to this"))
    g.add_argument("--json-out", help="also write the JSON lines to this file")
    g = parser.add_argument_group("model and batch (step, memory, scaling, loader, attention)")
    g.add_argument("--model", default="tf_efficientnet_lite0",
                   help="timm name or torchvision/<name> (default tf_efficientnet_lite0)")
    g.add_argument("--pretrained", choices=("auto", "embedded", "hub", "none"),
                   help="default: embedded weights for tf_efficientnet_lite0, else none (random; timing does "
                        "not depend on the weights, and nothing is downloaded)")
    g.add_argument("--image-size", type=int, default=96, help="default 96 (deltatl train's default)")
    g.add_argument("--batch-size", type=int, help=help_of("batch_size", "images per step (32 = deltatl train's default)"))
    g.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="step and memory (l2 is always included)")
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("execution")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default auto)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: per-thread costs, stable on a shared machine; "
                        "0 = torch's default)")
    g = parser.add_argument_group("scaling")
    g.add_argument("--batch-sizes", help=help_of("batch_sizes", "batch sizes at --image-size"))
    g.add_argument("--image-sizes", help=help_of("image_sizes", "image sizes at --batch-size"))
    g.add_argument("--scaling-methods", default="l2,delta", help="default l2,delta")
    g.add_argument("--scaling-repeats", type=int, help=help_of("scaling_repeats", "rounds"))
    g = parser.add_argument_group("throughput")
    g.add_argument("--throughput-models", help=help_of("throughput_models", "models"))
    g.add_argument("--throughput-sizes", help=help_of("throughput_sizes", "image sizes"))
    g.add_argument("--throughput-batch-size", type=int, help=help_of("throughput_batch_size", "batch"))
    g.add_argument("--throughput-variants", default=",".join(("fp32", "channels_last", "bf16", "bf16+channels_last")),
                   help="fp32, channels_last, bf16, bf16+channels_last (default all four)")
    g.add_argument("--throughput-repeats", type=int, help=help_of("throughput_repeats", "rounds"))
    g = parser.add_argument_group("loader")
    g.add_argument("--loader-workers", help=help_of("loader_workers", "DataLoader worker counts"))
    g.add_argument("--loader-batches", type=int, help=help_of("loader_batches", "batches per epoch"))
    g = parser.add_argument_group("attention")
    g.add_argument("--data", default="fashion-mnist", help="data of the L2-FE head fit (default fashion-mnist)")
    g.add_argument("--data-root", help="where a named dataset's files are")
    g.add_argument("--train-per-class", type=int, help="default: the dataset's (30 for fashion-mnist)")
    g.add_argument("--head-epochs", type=int, help=help_of("head_epochs", "L2-FE epochs of the head (official 10)"))
    g.add_argument("--attention-batches", type=int, default=1, help="training batches scored (default 1; official 4)")
    g.add_argument("--attention-layers", help=help_of("attention_layers", "all, none, or names / first / last"))
    g.add_argument("--attention-repeats", type=int, help=help_of("attention_repeats", "rounds"))
    g.add_argument("--naive-channels", type=int,
                   help=help_of("naive_channels", "channels per layer timed with the naive loop (extrapolated)"))
    g.add_argument("--naive-full-max", type=int, default=24,
                   help="also run the full naive loop on layers with at most this many channels (default 24; 0: never)")
    g.add_argument("--masks-per-forward", type=int, default=64, help="of the exact path (default 64)")
    g.add_argument("--sweep-masks", help=help_of("sweep_masks", "masks_per_forward values of the sweep ('' to skip)"))
    g.add_argument("--sweep-layers", default="last", help="layers of the sweep: names, first, last (default last)")
    g.add_argument("--sweep-repeats", type=int, default=2, help="default 2")


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Fill the sized defaults (full or --quick), parse the lists, check the values."""
    def fail(message: str) -> None:
        if parser is not None:
            parser.error(message)
        from ..errors import DeltatlError

        raise DeltatlError(message)

    for name, (full, quick) in SIZED_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, quick if args.quick else full)
    args.only = _names(args.only)
    unknown = [s for s in args.only if s not in SECTIONS]
    if unknown or not args.only:
        fail(f"--only: unknown section(s) {', '.join(unknown) or '(none given)'} (choose from {', '.join(SECTIONS)})")
    args.methods = list(dict.fromkeys(["l2", *_names(args.methods)]))
    args.scaling_methods = list(dict.fromkeys(_names(args.scaling_methods)))
    for method in set(args.methods) | set(args.scaling_methods):
        if method not in METHOD_NAMES and method != "l2-sp:fused":
            fail(f"unknown method '{method}' (choose from {', '.join(METHOD_NAMES)}, l2-sp:fused)")
    args.batch_sizes, args.image_sizes = _ints(args.batch_sizes), _ints(args.image_sizes)
    args.throughput_models, args.throughput_sizes = _names(args.throughput_models), _ints(args.throughput_sizes)
    args.throughput_variants = _names(args.throughput_variants)
    bad = [v for v in args.throughput_variants if not set(v.split("+")) <= {"fp32", "channels_last", "bf16"}]
    if bad:
        fail(f"--throughput-variants: unknown {', '.join(bad)}")
    args.loader_workers = _ints(args.loader_workers)
    for name in ("repeats", "scaling_repeats", "throughput_repeats", "attention_repeats", "image_size",
                 "batch_size", "throughput_batch_size", "loader_batches", "head_epochs", "attention_batches",
                 "naive_channels", "masks_per_forward", "sweep_repeats"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1")
    if args.batch_size < 2 or any(b < 2 for b in [*args.batch_sizes, args.throughput_batch_size]):
        fail("batch sizes must be at least 2 (BatchNorm in training mode)")
    if args.threads < 0:
        fail("--threads must be >= 0")
    return args


def run(args: argparse.Namespace) -> int:
    """Run the chosen sections; returns the exit status."""
    import torch

    from ..run import resolve_device
    from .common import Bench, log, machine_info

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)  # no inter-op parallelism in these models; fewer threads to fight
    except RuntimeError:  # already set in this process (e.g. a second run in the same test session)
        pass
    device = resolve_device(args.device)
    bench = Bench(args, device, machine_info(device))
    log(f"machine: {bench.machine}")
    bench.out = open(args.json_out, "w") if args.json_out else None
    try:
        training = None
        if {"step", "memory", "scaling"} & set(args.only):
            from .training import TrainingSections

            training = TrainingSections(bench)
        for section in SECTIONS:
            if section not in args.only:
                continue
            section_start = time.perf_counter()
            if section in ("step", "memory", "scaling"):
                getattr(training, section)()
            elif section == "throughput":
                from .throughput import throughput

                throughput(bench)
            elif section == "loader":
                from .throughput import loader

                loader(bench, training.l2_step_s if training is not None else None)
            else:
                from .attention import run_attention

                run_attention(bench)
            log(f"{section}: {time.perf_counter() - section_start:.0f} s")
    finally:
        if bench.out is not None:
            bench.out.close()
    log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m deltatl.bench`` (same options as ``deltatl bench``)."""
    parser = argparse.ArgumentParser(prog="deltatl bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(resolve(parser.parse_args(argv), parser))
