"""Command line: ``deltatl train | eval | predict | demo | compare | search | attention | report | bench``
(also ``python -m deltatl``).

Errors in the user's input print one line (``deltatl: error: ...``) and exit with status 2; an
interrupted training run exits with status 130 after writing a checkpoint that ``--resume`` continues.

Several processes (DDP): ``torchrun --standalone --nproc_per_node N -m deltatl train ...``, with
``--batch-size`` per process (see :mod:`deltatl.distributed`).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any, Sequence

from .config import EMBEDDED_DELTA_ALPHA, OFFICIAL_ALPHA, RELATIVE_ALPHA, TrainConfig, load_yaml, make_config
from .data import DATASETS
from .engine.objective import SOURCE_BN_MODES
from .errors import DeltatlError, on_command_line
from .launch import deferred_interrupt
from .extras import missing_extra_message
from .methods import METHODS
from .regularizers import DELTA_REDUCTIONS

TRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))  # the flags that are run settings

# The main job: DELTA (attention included, deltatl's default settings and alpha) next to plain
# fine-tuning, on the embedded default, on a 2-core CPU. Validation and test subsets keep it short.
DEMO_METHODS = ("l2", "delta")
DEMO_DEFAULTS = {"val_per_class": 20, "test_per_class": 300}


def _seconds(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _table_name(text: str) -> str:
    """argparse type: a name that can end a file name (letters, digits, '-', '_')."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise argparse.ArgumentTypeError(f"use letters, digits, '-' or '_', got {text!r}")
    return text


def _at_least_one(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _given_grids(args: argparse.Namespace) -> None:
    """A grid flag given with no values is a mistake, not "no grid"."""
    for name in ("alpha_grid", "beta_grid", "lr_grid"):
        if getattr(args, name, None) == []:
            raise DeltatlError(f"--{name.replace('_', '-')} needs at least one value")


def _group(parser: argparse.ArgumentParser, title: str) -> Callable[..., Any]:
    """A flag adder for one argument group. Every default is SUPPRESS, so that only flags actually
    given override the YAML file."""
    group = parser.add_argument_group(title)
    return lambda *args, **kwargs: group.add_argument(*args, default=argparse.SUPPRESS, **kwargs)


def _train_options(parser: argparse.ArgumentParser) -> None:
    """The run settings' flags (those of TrainConfig), in groups."""
    d = TrainConfig()
    _data_options(parser, d)
    _method_options(parser, d)
    _optimisation_options(parser, d)


def _data_options(parser: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The data and the model."""
    add = _group(parser, "data")
    add("--data", help=f"dataset name (fashion-mnist, caltech256-30, caltech256-60, caltech256, stanford-dogs, "
                       f"mit-indoor67, cub200, food101, list: see README) or image folder "
                       f"root/{{train,test[,val]}}/<class>/* (default {d.data})")
    add("--data-root", help="folder holding a named dataset's files (default: where the system put them)")
    add("--train-per-class", type=int, help="training images drawn per class with --seed; 0 = all "
                                            "(default: 30 for fashion-mnist, else all; fixed by the "
                                            "name for caltech256-30 / -60)")
    add("--val-per-class", type=int, help="validation images held out of the training data per class "
                                          "(default: --val-fraction of the training images)")
    add("--val-fraction", type=float, help=f"validation share when --val-per-class is not set (default {d.val_fraction})")
    add("--test-per-class", type=int, help="evaluate on a seeded subset of N test images per class "
                                           "(quick runs; default: the whole test set)")
    add("--image-size", type=int, help=f"crop size in pixels (default {d.image_size}; the papers used 224)")
    add("--resize", type=int, help="square resize before cropping (default image-size * 256/224)")
    add("--keep-aspect", action=argparse.BooleanOptionalAction,
        help="resize the shorter edge to --resize keeping the aspect ratio, train and test (the 'data "
             "augmentation' variant of the DELTA paper's Table 2; default off: square resize, as the official code)")
    add("--ten-crop", action=argparse.BooleanOptionalAction,
        help="10-crop evaluation: logits averaged over the 4 corner and centre crops and their flips "
             "(Table 2's variant; validation and test; default off: one centre crop)")
    add("--no-check-images", dest="check_images", action="store_false",
        help="do not decode every image file up front (unreadable files then stop the run)")
    add = _group(parser, "model")
    add("--model", help=f"timm model name or torchvision/<name> (default {d.model}, embedded ImageNet weights)")
    add("--pretrained", choices=("auto", "embedded", "hub", "none"),
        help="source weights: auto = embedded if available else the hub (default auto)")
    add("--checkpoint", help="local file with the source network's weights (timm or torchvision state dict)")
    add("--head-init", choices=("default", "zero"), help="new head initialisation (default: nn.Linear's)")
    add("--aux-weight", type=float,
        help="Inception-V3: keep the auxiliary classifier (new head for the target classes) and add this "
             "weight x its cross-entropy to the training loss (torchvision's recipe: 0.4); default 0: removed")


def _method_options(parser: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The method, its regularizers, RIFLE, the comparison tricks and the channel attention."""
    add = _group(parser, "method")
    add("--method", help=f"{', '.join(METHODS)} (default {d.method})")
    add("--alpha", type=float, help=f"weight of the L2-SP / DELTA term (default: the authors' {OFFICIAL_ALPHA:g}; "
                                    f"DELTA (with attention) on the embedded model {EMBEDDED_DELTA_ALPHA:g}, with the relative "
                                    f"term {RELATIVE_ALPHA:g}: see README; a run prints which applies)")
    add("--beta", type=float, help=f"weight of the head's L2 term for l2-sp / delta* (default {d.beta})")
    add("--delta-layers", help="comma-separated module names whose feature maps DELTA regularizes "
                               "(default: the architecture's preset)")
    add("--delta-reduction", choices=DELTA_REDUCTIONS,
        help=f"DELTA's term (default {d.delta_reduction}): sum (official: summed over the batch, alpha tuned "
             "for ResNet-101 at 224 px and batch 64), mean (sum / batch) or relative (each layer's squared "
             "distance over the source's squared activation, so alpha means the same for any model, image "
             "size or batch)")
    add("--delta-source-bn", choices=SOURCE_BN_MODES,
        help=f"the source network's BatchNorm in DELTA's term (default {d.delta_source_bn}): its running "
             "statistics (official) or the batch's (the term is then 0 at step 0 and measures only what "
             "training changed)")
    add("--l2sp-fused", action=argparse.BooleanOptionalAction,
        help="L2-SP: add its gradient alpha * (w - w*) after the backward, fused over the parameters (default), "
             "or through autograd (--no-l2sp-fused); the same step up to rounding, the fused one with less memory")
    add("--fine-tuned", metavar="RUN", help="wise-ft: the LP-FT run (same settings, method lp-ft) to interpolate, "
                                            "trained there unless finished (default: the run's fine_tuned folder)")
    add("--rifle", type=int, metavar="K",
        help="RIFLE: re-initialise the head K times, evenly spaced (default 0; on the embedded default it helped "
             "l2 and l2-sp and hurt delta: README, RIFLE)")
    add("--rifle-reset-momentum", action="store_true", help="RIFLE: also clear the head's momentum")
    add("--rifle-cyclic-lr", action="store_true", help="RIFLE: restarting cosine learning rate for the head")
    add = _group(parser, "tricks RIFLE was compared with (any method; default off)")
    add("--head-dropout", type=float, help="Dropout with this rate on the head's input (training only)")
    add("--head-dropconnect", type=float, help="DropConnect: drop each head weight with this rate, kept "
                                               "ones scaled by 1/(1-p) (training only)")
    add("--drop-path-rate", type=float, help="Stochastic Depth: timm's drop_path_rate (residual branches "
                                             "dropped per image, rate rising with depth; timm models)")
    add("--disturb-label", type=float, help="DisturbLabel: replace each training label by a uniformly drawn "
                                            "class with this probability (seeded per step)")
    add = _group(parser, "supervised channel attention (method delta)")
    add("--attention-file", help="raw channel scores (deltatl or official JSON) instead of computing them")
    add("--attention-method", choices=("exact", "first_order", "naive"),
        help="exact (fast, default), first_order (activation x gradient) or naive (reference loop)")
    add("--attention-epochs", type=int, help=f"L2-FE epochs before scoring (default {d.attention_epochs})")
    add("--attention-lr", type=float, help=f"L2-FE learning rate (default {d.attention_lr})")
    add("--attention-batches", type=int, help=f"training batches scored (default {d.attention_batches})")
    add("--attention-batch-size", type=int, help=f"default {d.attention_batch_size}")
    add("--no-attention-bn-train", dest="attention_bn_train", action="store_false",
        help="freeze BatchNorm statistics during the L2-FE fit (the official code let them adapt)")
    add("--attention-temperature", type=float, help=f"softmax temperature (default {d.attention_temperature})")
    add("--attention-cache", help="folder of cached raw scores (default ~/.cache/deltatl/attention; "
                                  "$DELTATL_CACHE/attention when set)")


def _optimisation_options(parser: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The optimiser and its schedule, precision, and how and where the run executes."""
    add = _group(parser, "optimisation")
    add("--epochs", type=int, help=f"training epochs (default {TrainConfig.DEFAULT_EPOCHS})")
    add("--iters", type=int, help="training iterations instead of epochs")
    add("--batch-size", type=int, help=f"images per step (default {d.batch_size}); under torchrun per process: "
                                       "N processes train on global batches of N x this")
    add("--lr", type=float, help=f"SGD learning rate (default {d.lr})")
    add("--momentum", type=float, help=f"default {d.momentum}")
    add("--weight-decay", type=float, help="default: the method's (1e-4 for l2 and l2-fe)")
    add("--schedule", choices=("step", "exp", "cosine", "constant", "cosine-restarts", "triangular"),
        help="lr schedule: step = /10 after --decay-at (default), exp = x gamma every epoch reaching /10 "
             "there (Figure 2's ExponentialLR), cosine, constant; cyclic: cosine-restarts, triangular")
    add("--decay-at", type=int, help="step / exp schedules: lr / 10 after this many steps "
                                     "(default 2/3 of training; the paper: 6000 of 9000)")
    add("--lr-cycles", type=int, help=f"cycles of the cyclic schedules (default {d.lr_cycles})")
    add("--lr-min-factor", type=float, help="lowest lr of the cyclic schedules, as a fraction of --lr "
                                            f"(default {d.lr_min_factor})")
    add("--seed", type=int, help=f"default {d.seed}")
    add = _group(parser, "execution")
    add("--device", help="cpu, cuda, cuda:N, mps or auto (default auto)")
    add("--workers", type=int, help="data-loading processes (default: 0 on the CPU, where the training step "
                                    "needs the cores (BENCHMARKS.md); min(8, usable CPUs per process) on CUDA)")
    add("--eval-every", type=int, help="validate every N epochs (default 1)")
    add("--tensorboard", action="store_true",
        help="also write TensorBoard event files in the run directory (tensorboard --logdir runs)")
    add("--out", help="run directory (default runs/<method>_<data>_<model>_seed<seed>)")
    add("--amp", choices=("none", "bf16", "fp16"),
        help="mixed precision: bf16 autocast, or fp16 with a gradient scaler; loss terms stay float32 "
             "(default none: it changes the result, and on CPUs without bf16 units it is several times slower)")
    add("--channels-last", action=argparse.BooleanOptionalAction,
        help="channels-last memory format for the networks and images (default auto: on for CPU and CUDA, "
             "where deltatl bench measured it faster, off on MPS; it changes only floating-point rounding)")
    add("--compile", action="store_true", help="torch.compile the target network (default off; compiling "
                                               "costs a minute or more up front)")
    add("--sync-bn", action="store_true",
        help="under torchrun: BatchNorm statistics of the global batch, so N processes x --batch-size b "
             "train exactly like one process with N*b (default off: each process's own b images)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatl", description="Regularized transfer learning of "
                                     "pretrained CNNs: DELTA, L2-SP, L2-FE, RIFLE and BSS, LwF, Co-Tuning, "
                                     "StochNorm, LP-FT, WiSE-FT.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a pretrained network on a dataset (DELTA unless --method says "
                                     "otherwise)")
    p.add_argument("--config", help="YAML file of settings (flags given here override it)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _train_options(p)

    p = sub.add_parser("export", help="a run's model in timm's Hugging Face layout (timm loads it, no deltatl)")
    p.add_argument("run", help="a run directory or its checkpoint.pt")
    p.add_argument("--out", required=True, help="the folder to write (config.json, model.safetensors)")
    p.add_argument("--format", choices=("timm", "onnx"), default="timm",
                   help="onnx: also model.onnx (input 'images', dynamic batch; output 'logits')")

    p = sub.add_parser("eval", help="evaluate a run's checkpoint on a split of its dataset")
    p.add_argument("checkpoint", help="a run directory or its checkpoint.pt")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument("--data-root", help="where the run's data is now: its image folder, or a named dataset's files "
                   "(default: as in the run)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("predict", help="top-k classes of image files")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", help="a run directory, its checkpoint.pt or a `deltatl export` folder "
                   "(default: the embedded ImageNet model)")
    p.add_argument("--top-k", type=_at_least_one, default=5)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("compare", help="methods x seeds with one budget: a mean +/- std table")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help="method specs, e.g. l2 l2-sp delta delta+rifle3")
    p.add_argument("--seeds", type=_at_least_one, default=5, help="seeds 0..N-1 (default 5, as the paper)")
    p.add_argument("--alpha-grid", nargs="*", default=None,
                   help="choose each method's alpha on the first seed's validation split among these: "
                        "0.001 0.01 (every method) or per method, delta=1e-4,1e-3 l2-sp=1e-3,1e-2")
    p.add_argument("--poll", type=_seconds, default=10.0,
                   help="the same command may run in several processes on one --out: each trains the runs no "
                        "other is training and reads theirs when done, looking again every POLL seconds "
                        "(default 10)")
    p.add_argument("--table", type=_table_name, default=None,
                   help="name the table files results-TABLE.md, ... so that comparisons of other methods in the "
                        "same --out (sharing its runs) keep their own tables (default: results.md, ...)")
    p.add_argument("--config", help="YAML file of shared settings")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs")
    _train_options(p)

    _add_search_command(sub)

    p = sub.add_parser("attention", help="DELTA's supervised channel attention scores, to a JSON file")
    p.add_argument("--output", default="attention.json", help="raw scores file (default attention.json)")
    p.add_argument("--config", help="YAML file of settings")
    p.add_argument("--quiet", action="store_true")
    _train_options(p)

    p = sub.add_parser("demo", help="the main job: several methods on the embedded default, one table")
    p.add_argument("--methods", nargs="+", default=list(DEMO_METHODS))
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue interrupted demo runs")
    _train_options(p)
    p.set_defaults(**DEMO_DEFAULTS)

    p = sub.add_parser("bench", help="benchmark suite: step time, memory, throughput, attention (JSON lines)",
                       description="Benchmarks with honest ratios: methods interleaved round by round on "
                                   "the same model, batch and input size; JSON lines on stdout, progress on "
                                   "stderr (see BENCHMARKS.md).")
    from .bench import add_arguments as add_bench_arguments

    add_bench_arguments(p)

    _add_report_command(sub)
    return parser


def _add_search_command(sub: Any) -> None:
    """``deltatl search``: a grid or ranges, folds, the shared study."""
    p = sub.add_parser("search", help="alpha (and beta, lr) of one method by k-fold cross-validation, "
                                      "then a refit evaluated on the test split (Optuna)")
    p.add_argument("--alpha-grid", nargs="*", default=None,
                   help="candidate alphas, e.g. 1e-4 1e-3 1e-2 (default, with no grid or range: the method's "
                        "alpha and a decade either side)")
    p.add_argument("--beta-grid", nargs="*", default=None, help="candidate betas (default: --beta alone)")
    p.add_argument("--lr-grid", nargs="*", default=None, help="candidate learning rates (default: --lr alone)")
    p.add_argument("--alpha-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                   help="instead of a grid: Optuna's TPE sampler draws alpha log-uniformly from [LOW, HIGH]")
    p.add_argument("--beta-range", nargs=2, type=float, metavar=("LOW", "HIGH"), help="likewise for beta")
    p.add_argument("--lr-range", nargs=2, type=float, metavar=("LOW", "HIGH"), help="likewise for the learning rate")
    p.add_argument("--trials", type=_at_least_one, default=20,
                   help="with ranges: trials to finish, over all workers (default 20)")
    p.add_argument("--sampler-seed", type=int, default=0, help="with ranges: the TPE sampler's seed (default 0)")
    p.add_argument("--no-prune", dest="prune", action="store_false",
                   help="with ranges: run every fold of every trial (default: the median pruner stops a trial "
                        "whose first folds score below the median of earlier trials)")
    p.add_argument("--folds", type=int, default=5, help="k of the stratified k-fold split of the training "
                                                        "split (default 5)")
    p.add_argument("--storage", help="study database shared by workers on several machines, e.g. "
                                     "postgresql://user:password@host/db (default: SQLite file in --out)")
    p.add_argument("--study-name", default="deltatl-search", help="default deltatl-search")
    p.add_argument("--leave-when-idle", action="store_true",
                   help="grid mode: exit once nothing is left to start while other workers run the last trials "
                        "(the last of them writes the results) instead of waiting for them")
    p.add_argument("--poll", type=_seconds, default=10.0,
                   help="seconds between looks for work while other workers run the last trials (default 10)")
    p.add_argument("--config", help="YAML file of shared settings")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs (finished runs are "
                                                         "always reused)")
    _train_options(p)


def _add_report_command(sub: Any) -> None:
    """``deltatl report``: the papers' figures for runs."""
    p = sub.add_parser("report", help="the DELTA paper's figures and tables for runs, on one HTML page")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (e.g. runs/fm30/*/seed0)")
    p.add_argument("--out", required=True, help="report folder: index.html, PNG + SVG figures, CSV/JSON numbers")
    p.add_argument("--layer", help="tapped layer of the activation maps (default: the deepest whose maps are "
                                   ">= 8 positions wide)")
    p.add_argument("--filters", type=int, default=3, help="weak source channels shown (default 3)")
    p.add_argument("--images", type=int, default=2, help="images shown per channel (default 2)")
    p.add_argument("--sample", type=int, default=32, help="test images on which activations are measured (default 32)")
    p.add_argument("--keypoints", help="folder in CUB-200-2011's format with parts/part_locs.txt (default: the "
                                       "runs' own annotations when they are on cub200)")
    p.add_argument("--keypoint-images", type=int, default=300, help="annotated test images used (0 = all; default 300)")
    p.add_argument("--seed", type=int, default=0, help="which sample images are drawn (default 0)")
    p.add_argument("--device", default="cpu", help="where the networks run (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _config_from(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> TrainConfig:
    """The run settings: ``defaults`` (a command's own), then ``--config``'s file, then the flags given
    that are settings (the others, ``--methods``, ``--folds``..., belong to the command)."""
    file_values = load_yaml(args.config) if getattr(args, "config", None) else {}
    cli = {k: v for k, v in vars(args).items() if k in TRAIN_FIELDS}
    config = make_config({**(defaults or {}), **file_values}, cli)
    if config.data not in DATASETS and os.path.isdir(config.data):
        # an image folder by its absolute path: `deltatl eval RUN` then works from any directory
        config = dataclasses.replace(config, data=os.path.abspath(config.data))
    return config


def format_table(rows: list[dict[str, Any]]) -> str:
    """A small fixed-width result table."""
    cols = [("method", "method", "{}"), ("alpha", "alpha", "{:g}"), ("rifle", "rifle", "{}"),
            ("val top-1 %", "val_top1", "{:.2f}"),
            ("test top-1 %", "test_top1", "{:.2f}"), ("epochs", "epochs", "{}"), ("seconds", "seconds", "{:.0f}")]
    cells = [[h for h, _, _ in cols]] + [
        ["-" if r.get(k) is None else f.format(r[k]) for _, k, f in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from .distributed import is_primary_process
    from .run import train_run

    config = _config_from(args)
    summary = train_run(config, resume=args.resume, progress=not args.quiet)
    if is_primary_process():  # under torchrun, one table
        print(format_table([summary]))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .run import default_out, train_run

    base = _config_from(args)
    rows = []
    for method in args.methods:
        config = make_config({}, {**base.__dict__, "method": method,
                                  "out": os.path.join(base.out or "runs/demo", method)})
        print(f"== {method} -> {config.out or default_out(config)}", file=sys.stderr)
        rows.append(train_run(config, resume=args.resume, progress=not args.quiet))
    print(format_table(rows))
    return 0


def _train_only(base: TrainConfig, command: str) -> None:
    """Refuse the settings that name one run's inputs, which a command training many runs cannot share."""
    if base.fine_tuned:
        raise DeltatlError(f"--fine-tuned names one LP-FT run, for `deltatl train`; {command} trains (or reuses) "
                           f"the LP-FT run of each of its wise-ft runs itself")


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import (compare, markdown_table, paired_differences, paired_table, parse_alpha_grid,
                          results_name, results_tag)
    from .run import train_run

    _given_grids(args)
    base = _config_from(args)
    _train_only(base, "compare")
    out = base.out or os.path.join("runs", "compare")
    table = args.table or ""  # None when not given: argparse would run a "" default through _table_name
    rows = compare(base, args.methods, list(range(args.seeds)), out, parse_alpha_grid(args.alpha_grid or []),
                   train=lambda c: train_run(c, resume=args.resume, progress=not args.quiet),
                   poll_seconds=args.poll, table=table)
    print(markdown_table(rows))
    paired = paired_differences({r["method"]: r["tests"] for r in rows})
    if paired and args.seeds > 1:
        print("\nPaired by seed, test top-1 of the method minus the other:\n" + paired_table(paired))
    tag = results_tag(base, table)
    names = ", ".join(results_name(n, tag) for n in ("results.md", "results.csv", "paired.csv"))
    print(f"({names} and every run directory in {out})")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .run import open_splits, train_run
    from .config import parse_grid_values
    from .search import Grid, check_search, default_alpha_grid, markdown, search

    _given_grids(args)
    # Every training image takes part in the folds unless a held-out validation split is asked for.
    base = _config_from(args, defaults={"val_per_class": 0})
    _train_only(base, "search")
    grid = Grid(parse_grid_values("--alpha-grid", args.alpha_grid or []),
                parse_grid_values("--beta-grid", args.beta_grid or []), parse_grid_values("--lr-grid", args.lr_grid or []))
    out = base.out or os.path.join("runs", f"search_{base.method}")
    ranges = [args.alpha_range, args.beta_range, args.lr_range]
    if any(ranges):
        if grid.names():
            raise DeltatlError("give either grids (--alpha-grid ...) or ranges (--alpha-range ...), not both")
        if args.leave_when_idle:
            raise DeltatlError("--leave-when-idle is for grids: with ranges every worker samples until --trials")
        return _sampled_search(args, base, out)
    if not grid.names():
        grid = dataclasses.replace(grid, alpha=default_alpha_grid(base))
        if grid.alpha and not args.quiet:
            print(f"deltatl search: no grid given: alpha {' '.join(f'{a:g}' for a in grid.alpha)} "
                  f"({base.method}'s alpha, {base.resolved_alpha():g}, and a decade either side)", file=sys.stderr)
    check_search(base, grid, args.folds, out)  # before the data is opened
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own one-line progress instead
    results = search(base, open_splits(base, progress=not args.quiet).train, grid, out, folds=args.folds,
                     storage=args.storage, study_name=args.study_name, poll_seconds=args.poll,
                     train=lambda c: train_run(c, resume=args.resume, progress=not args.quiet),
                     leave_when_idle=args.leave_when_idle)
    if results is None:
        print(f"(this worker is done; the study's last worker writes search.md in {out})")
        return 0
    print(markdown(results), end="")
    print(f"(search.json, search.md, the folds and every run directory in {out})")
    return 0


def _sampled_search(args: argparse.Namespace, base: TrainConfig, out: str) -> int:
    """``deltatl search`` with ranges: Optuna's TPE sampler and median pruner (deltatl.sampled_search)."""
    import optuna

    from .run import open_splits, train_run
    from .sampled_search import Ranges, check_sampled_search, sampled_markdown, sampled_search

    ranges = Ranges(*(tuple(r) if r else None for r in (args.alpha_range, args.beta_range, args.lr_range)))
    check_sampled_search(base, ranges, args.folds, args.trials, out)  # before the data is opened
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_name = args.study_name if args.study_name != "deltatl-search" else "deltatl-search-tpe"
    results = sampled_search(base, open_splits(base, progress=not args.quiet).train, ranges, out, trials=args.trials,
                             folds=args.folds, storage=args.storage, study_name=study_name,
                             sampler_seed=args.sampler_seed, prune=args.prune, poll_seconds=args.poll,
                             train=lambda c: train_run(c, resume=args.resume, progress=not args.quiet))
    print(sampled_markdown(results), end="")
    print(f"(search.json, search.md, the folds and every run directory in {out})")
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from .attention import normalize_scores
    from .run import attention_run

    config = _config_from(args)
    raw = attention_run(config, args.output, progress=not args.quiet)
    weights = normalize_scores(raw, config.attention_temperature)
    print(f"{'layer':<28} channels  max weight x C  top channels")
    for name, w in weights.items():
        top = w.topk(min(5, len(w))).indices.tolist()
        print(f"{name:<28} {len(w):>8}  {float(w.max() * len(w)):>14.2f}  {top}")
    print(f"raw scores written to {args.output}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .predict import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, split=args.split, data_root=args.data_root,
                                 device=args.device, progress=not args.quiet)
    print(f"{args.split}: top-1 {result['top1']:.2f}%  loss {result['loss']:.4f}  ({result['n']} images)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict_files

    for path, top in predict_files(args.images, checkpoint=args.checkpoint, top_k=args.top_k,
                                   device=args.device):
        print(path)
        for name, prob in top:
            print(f"  {prob * 100:6.2f}%  {name}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    out = export_run(args.run, args.out, onnx=args.format == "onnx")
    print(f"exported to {out} (timm.create_model('local-dir:{out}', pretrained=True)"
          + (f"; ONNX: {os.path.join(out, 'model.onnx')})" if args.format == "onnx" else ")"))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    for name in ("filters", "images", "sample"):
        if getattr(args, name) < 1:
            raise DeltatlError(f"--{name} must be at least 1")
    if args.keypoint_images < 0:
        raise DeltatlError("--keypoint-images must be >= 0")
    path = build_report(args.runs, args.out, layer=args.layer, filters=args.filters, images=args.images,
                        sample=args.sample, keypoints=args.keypoints, keypoint_images=args.keypoint_images,
                        seed=args.seed, device=args.device, progress=not args.quiet)
    print(f"report written to {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import resolve, run

    return run(resolve(args))


COMMANDS = {"train": cmd_train, "export": cmd_export, "eval": cmd_eval, "predict": cmd_predict, "demo": cmd_demo, "compare": cmd_compare,
            "search": cmd_search, "attention": cmd_attention, "report": cmd_report, "bench": cmd_bench}


def command_flags(parser: argparse.ArgumentParser, command: str) -> set[str]:
    """The option names (without ``--``) of one subcommand: the settings its messages may call flags."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # argparse has no public way
    return {o[2:] for action in sub.choices[command]._actions for o in action.option_strings if o.startswith("--")}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .engine.fit import Interrupted

    flags = command_flags(parser, args.command)
    previous_format = warnings.formatwarning
    warnings.formatwarning = lambda msg, cat, *a, **k: f"deltatl: warning: {on_command_line(str(msg), flags)}\n"
    try:
        with deferred_interrupt():  # the commands' heavy imports, as the executable does for PyTorch's
            import timm  # noqa: F401
            import torchvision  # noqa: F401
        return COMMANDS[args.command](args)
    except DeltatlError as exc:
        # A DataLoader worker re-raises our error with the worker's traceback as its message.
        message = str(exc).rstrip().splitlines()[-1].removeprefix("deltatl.errors.DeltatlError: ")
        print(f"deltatl: error: {on_command_line(message, flags)}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"deltatl: {exc}; continue with the same command plus --resume", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # outside a training loop (e.g. while scoring the channel attention)
        # commands that can resume, run without --resume
        hint = "; finished work is kept: the same command plus --resume continues" \
            if getattr(args, "resume", None) is False else ""
        print(f"deltatl: interrupted{hint}", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        message = missing_extra_message(exc)
        if message is None:
            raise
        print(f"deltatl: error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only or unreadable folder: the system's own words, one line
        where = f": {exc.filename}" if exc.filename else ""
        print(f"deltatl: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = previous_format


if __name__ == "__main__":
    sys.exit(main())
