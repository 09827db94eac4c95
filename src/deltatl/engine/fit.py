"""``fit()``: the one training loop, used by the CLI, the tests and the searches.

It owns the epochs, the learning-rate schedule, evaluation, ``metrics.jsonl``, checkpoints and resuming.
A run interrupted by SIGINT or SIGTERM stops after the current step (at an epoch's last step, after
logging and validating that epoch), writes a checkpoint and raises :class:`Interrupted`;
``fit(..., resume=True)`` then continues and reaches exactly the result of an uninterrupted run (same
data order, same augmentation draws, same dropout draws).

Distributed data parallel (``dist`` from :func:`deltatl.distributed.init_from_env`): ``batch_size`` is
the batch of one process and a step consumes ``world_size * batch_size`` images; only the target
network is wrapped; every process stops at the same step (the stop flag is agreed on with one small
all-reduce every ``sync_every`` steps and at every epoch end); only rank 0 writes files. See
:mod:`deltatl.distributed`.

Speed switches, all off by default because each changes the floating-point result or costs a
compilation. On a 2-core AVX2 CPU (no bf16 instructions) a bf16 step was 5-6x slower than float32
for ``test_resnet`` and 7x or more for EfficientNet-Lite0 (depthwise convolutions): leave bf16 off on
such CPUs; it is for GPUs and CPUs with bf16 units (AMX, AVX512-BF16). channels_last: ``deltatl bench``
(one thread, interleaved, loaded machine) measured 1.1-1.7x faster training steps for EfficientNet-Lite0
and ResNet-50 on that CPU, other runs there saw no difference; see BENCHMARKS.md before changing the
default.

- ``amp="bf16"``: autocast the networks' forward passes (target, source) to bfloat16, no scaler.
  ``amp="fp16"``: float16 with a :class:`torch.amp.GradScaler` (its inf check syncs the host each
  step). Only the networks run under autocast (:func:`autocast_networks`): the logits come out in
  float32 and the cross-entropy and regularizer terms are computed outside autocast, in float32 (a
  blanket autocast would run DELTA's channel weighting, a matrix product, in low precision).
- ``channels_last``: the networks and the images in channels-last memory format (faster convolutions
  on recent GPUs).
- ``compile_model``: ``torch.compile`` the target network (before the DDP wrap; the feature hooks are
  registered before compilation and never change).

The hot loop has no host synchronisation except at logging steps (``log_every``, rank 0, only when
the progress bar is shown), at epoch ends, and for the DDP stop flag (see ``sync_every``).
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from ..data import TransformedImages
from ..distributed import SINGLE, DistEnv, convert_sync_batchnorm
from ..errors import DeltatlError
from ..models import head_module
from ..outputs import atomic_open
from . import checkpoint as ckpt
from .evaluate import evaluate
from .objective import Objective
from .rifle import Rifle
from .tricks import DisturbLabel
from .schedule import create_schedule

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Process r of a DDP run seeds its global RNG (dropout) with seed + r * stride: the processes draw
# different dropout masks for their different images, and rank 0 draws those of a single-process run.
RANK_SEED_STRIDE = 1_000_003


class Interrupted(Exception):
    """Training stopped on a signal; the checkpoint on disk resumes it."""


class EpochSampler(Sampler[int]):
    """A random permutation that depends only on ``(seed, epoch)``, read from position ``start``.

    Under DDP (``world_size > 1``) the permutation is cut, from ``start`` on, into global batches of
    ``world_size * batch_size`` consecutive positions, and process ``rank`` gets slice ``rank`` of each
    complete global batch (``batch_size`` positions): in every step the processes' batches are
    disjoint and together are exactly the batch of a single process with batch size
    ``world_size * batch_size``. An incomplete last global batch is dropped, as a single process drops
    its incomplete last batch.
    """

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0, *, batch_size: int = 1, rank: int = 0,
                 world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        if self.world_size == 1:
            return iter(order[self.start:].tolist())
        b, g = self.batch_size, self.batch_size * self.world_size
        first = self.start + self.rank * b
        mine = [order[first + k * g: first + k * g + b] for k in range((self.n - self.start) // g)]
        return iter(np.concatenate(mine).tolist() if mine else [])

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.n - self.start
        return (self.n - self.start) // (self.batch_size * self.world_size) * self.batch_size


def epoch_steps(n_train: int, batch_size: int) -> int:
    """Steps in one epoch of (global) batches: full batches only (BatchNorm must never see a batch of one)."""
    return max(1, n_train // batch_size)


@contextmanager
def _stop_on_signals() -> Iterator[dict[str, int]]:
    """Turn SIGINT/SIGTERM into a flag checked between steps (only possible in the main thread)."""
    flag: dict[str, int] = {}

    def handler(signum: int, _frame: Any) -> None:
        flag["signal"] = signum

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: no signal handling, nothing to restore
        previous = {}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class AutocastForward(nn.Module):
    """Runs ``inner`` under autocast and returns its floating-point output in float32, so that what
    is computed from it (the loss) is computed in float32 and outside autocast."""

    def __init__(self, inner: nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.inner, self.device_type, self.dtype = inner, device_type, dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            out = self.inner(*args, **kwargs)
        return out.float() if isinstance(out, Tensor) and out.is_floating_point() else out


@contextmanager
def _training_networks(objective: Objective, net: nn.Module, device_type: str,
                       amp_dtype: torch.dtype | None) -> Iterator[None]:
    """Put ``net`` (the target, possibly compiled and DDP-wrapped) in place of ``objective.model``,
    both networks under autocast if ``amp_dtype``; restore the bare networks on exit. The hooks,
    the L2-SP parameters and RIFLE's head are inner modules and parameters, unaffected."""
    bare, source = objective.model, getattr(objective, "source", None)
    objective.model = AutocastForward(net, device_type, amp_dtype) if amp_dtype else net
    if source is not None and amp_dtype:
        objective.source = AutocastForward(source, device_type, amp_dtype)
    try:
        yield
    finally:
        objective.model = bare
        if source is not None:
            objective.source = source


def autocast_networks(objective: Objective, device_type: str, dtype: torch.dtype) -> Any:
    """Context manager: ``objective``'s forward with its networks under autocast (what ``fit`` does
    with ``amp``); the loss terms stay float32."""
    return _training_networks(objective, objective.model, device_type, dtype)


def train_step(objective: Objective, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               images: Tensor, labels: Tensor, sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """One optimisation step exactly as :func:`fit` runs it (``deltatl bench`` times this function).

    Forward through the objective, backward (scaled for fp16), optimizer step, and the running sums
    of the logged terms accumulated on the device: no host synchronisation.
    """
    out = objective(images, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    for key, value in out.items():
        if key != "logits":
            sums[key] += value.detach().double()
    sums["count"] += 1
    return out


def _strict(value: Any) -> Any:
    """JSON has no NaN or infinity: such a number is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _append_metrics(path: str, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({k: _strict(v) for k, v in row.items()}, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _truncate_metrics(path: str, last_step: int) -> None:
    """Drop rows written after the checkpoint a resumed run starts from (they will be redone)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= last_step]
    with atomic_open(path) as f:
        f.writelines(rows)


def fit(objective: Objective, train_set: TransformedImages, val_set: Dataset | None, test_set: Dataset | None,
        *, run_dir: str, total_steps: int, batch_size: int, lr: float, momentum: float = 0.9,
        weight_decay: float = 0.0, schedule: str = "step", decay_fraction: float = 2 / 3,
        device: torch.device = torch.device("cpu"), seed: int = 0, num_workers: int = 0, eval_every: int = 1,
        log_every: int = 10, rifle: Rifle | None = None, resume: bool = False, progress: bool = True,
        run_info: dict[str, Any] | None = None, dist: DistEnv = SINGLE, amp: str = "none",
        channels_last: bool = False, compile_model: bool = False, sync_bn: bool = False,
        sync_every: int | None = None, lr_cycles: int = 1, lr_min_factor: float = 0.0,
        disturb: DisturbLabel | None = None) -> dict[str, Any]:
    """Train ``objective`` with SGD for ``total_steps`` steps and evaluate it.

    Validation accuracy is measured every ``eval_every`` epochs and at the end; the test set is
    evaluated exactly once, at the end, on the final model (never used for any choice).

    Args:
        run_dir: where ``checkpoint.pt``, ``metrics.jsonl`` and ``summary.json`` are written (by rank 0).
        total_steps: optimisation steps; an epoch is ``len(train_set) // (world_size * batch_size)``
            steps (the last incomplete batch is dropped so BatchNorm never sees a batch of one).
        batch_size: images per step *and process*; the global batch is ``world_size * batch_size``.
        decay_fraction: where the step schedule divides the rate by 10 (exp: where it reaches /10).
        lr_cycles, lr_min_factor: cycles and floor (fraction of ``lr``) of the cyclic schedules
            (``cosine-restarts``, ``triangular``; see :mod:`deltatl.engine.schedule`).
        rifle: re-initialise the head at the given steps (RIFLE); see :mod:`deltatl.engine.rifle`.
        disturb: DisturbLabel, applied to every training batch's labels (seeded by the step, so
            resuming and DDP stay exact); see :mod:`deltatl.engine.tricks`.
        run_info: stored in the checkpoint and the summary (method, model, classes, config...).
        dist: the process's place in a DDP job (every process calls ``fit`` with the same arguments).
            The objective must have been built with ``distance_scale=world_size`` for DELTA's
            ``reduction="sum"``.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` (autocast; fp16 with a gradient scaler).
        channels_last: channels-last memory format for the networks and the images.
        compile_model: ``torch.compile`` the target network.
        sync_bn: under DDP, BatchNorm statistics of the global batch instead of each process's slice
            (needed for a step to equal the single-process step on the global batch).
        sync_every: under DDP, agree on the stop flag every this many steps (and at every epoch end).
            Default: every step on the CPU (one all-reduce of one int, well under a millisecond with
            gloo), every ``log_every`` steps on CUDA (where reading the flag waits for the GPU).

    Returns:
        The summary: ``val_top1``, ``test_top1`` (percent), losses, ``epochs``, ``steps``, ``seconds``.
    """
    primary, world = dist.is_primary, dist.world_size
    ckpt_path, metrics_path = os.path.join(run_dir, CHECKPOINT), os.path.join(run_dir, METRICS)
    n_train = len(train_set)
    if n_train == 0:
        raise DeltatlError("the training split is empty")
    if dist.enabled and n_train < batch_size * world:
        raise DeltatlError(f"the training split has {n_train} images, fewer than one global batch of "
                           f"{world} processes x {batch_size}: lower --batch-size")
    if amp not in AMP_DTYPES:
        raise DeltatlError(f"unknown --amp '{amp}' (choose from {', '.join(AMP_DTYPES)})")
    amp_dtype = AMP_DTYPES[amp]
    drop_last = n_train >= batch_size
    steps_per_epoch = epoch_steps(n_train, batch_size * world)
    epochs = math.ceil(total_steps / steps_per_epoch)
    if sync_every is None:
        sync_every = log_every if device.type == "cuda" else 1
    if primary:
        os.makedirs(run_dir, exist_ok=True)

    ckpt.seed_everything(seed + RANK_SEED_STRIDE * dist.rank)
    objective.to(device)
    # Target, source, L2-SP starting point and attention: rank 0's on every process.
    dist.broadcast_module_(objective)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        objective.to(memory_format=torch.channels_last)
    # The head is the last parameter group, so RIFLE's cyclic schedule can address it alone.
    optimizer = torch.optim.SGD(objective.param_groups(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = create_schedule(optimizer, schedule, total_steps, steps_per_epoch, decay_fraction,
                                cycles=lr_cycles, min_factor=lr_min_factor)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    step, elapsed = 0, 0.0
    gap: Tensor | None = None  # DELTA: the part of its term due to BatchNorm statistics, on an epoch's first batch
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64, device=device))
    if dist.broadcast_object(resume and os.path.isfile(ckpt_path)):
        state = ckpt.load(ckpt_path)
        if state.get("world_size", 1) != world:
            raise DeltatlError(f"{ckpt_path} was written by {state.get('world_size', 1)} process(es); resume it "
                               f"with as many (torchrun --nproc_per_node), not {world}")
        objective.model.load_state_dict(state["model"])
        objective.load_regularizer_state(state["regularizer"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, elapsed, gap = state["step"], state["seconds"], state.get("bn_gap")
        for k, v in state["epoch_sums"].items():
            sums[k] = v.to(device)
        ckpt.set_rng_state(state.get("rng_per_rank", [state["rng"]])[dist.rank])
        if primary:
            _truncate_metrics(metrics_path, step)
    elif primary and os.path.isfile(metrics_path):
        os.remove(metrics_path)

    bare = objective.model
    if sync_bn and dist.enabled:
        convert_sync_batchnorm(bare)
        if getattr(objective, "source", None) is not None:  # DELTA's source with batch statistics: global too
            convert_sync_batchnorm(objective.source)
    # Only the target network is compiled and wrapped; hooks, L2-SP and RIFLE hold its inner modules
    # and parameters, which neither wrapper replaces.
    net = torch.compile(bare) if compile_model else bare
    if dist.enabled:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    def reduce_sums() -> None:
        """Collective: every running sum becomes the mean of the processes' (the count is the same)."""
        if dist.enabled and sums:
            keys = sorted(sums)
            packed = dist.all_reduce_sum_(torch.stack([sums[k] for k in keys])) / world
            sums.update(zip(keys, packed.unbind()))

    def save(done: bool = False) -> None:
        """Collective (the RNG states of all processes are gathered); rank 0 writes."""
        rng = dist.gather_object(ckpt.rng_state())
        if not primary:
            return
        state = {"model": bare.state_dict(), "regularizer": objective.regularizer_state(),
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                 "step": step, "total_steps": total_steps, "seconds": elapsed + time.perf_counter() - started,
                 "epoch_sums": {k: v.cpu() for k, v in sums.items()}, "rng": rng[0],
                 "bn_gap": None if gap is None else gap.cpu(),
                 "world_size": world, "run_info": run_info or {}, "done": done}
        if dist.enabled:
            state["rng_per_rank"] = rng
        ckpt.save_atomic(state, ckpt_path)

    def eval_split(dataset: Dataset | None, name: str) -> dict[str, float]:
        if dataset is None or len(dataset) == 0:
            return {}
        if dist.enabled:  # DDP leaves each process with its own last BatchNorm update: use rank 0's
            dist.broadcast_tensors_(list(bare.buffers()))
        return evaluate(bare, dataset, batch_size=batch_size, device=device, num_workers=num_workers, desc=name,
                        progress=progress, dist=dist, amp_dtype=amp_dtype, channels_last=channels_last)

    started = time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=None if progress and primary else True)
    val: dict[str, float] = {}
    try:
        with _training_networks(objective, net, device.type, amp_dtype), _stop_on_signals() as stop:
            while step < total_steps:
                epoch, start = divmod(step, steps_per_epoch)
                train_set.set_epoch(epoch)
                objective.train()  # again after each evaluation, which put the model in eval mode
                sampler = EpochSampler(n_train, seed, epoch, start * batch_size * world, batch_size=batch_size,
                                       rank=dist.rank, world_size=world)
                # Its own generator: a DataLoader draws its workers' base seed when an iterator starts,
                # from the global RNG otherwise, and a run resumed mid-epoch starts one more iterator
                # than the uninterrupted run, which would shift every later dropout / drop-path draw.
                loader = DataLoader(train_set, batch_size=batch_size, drop_last=drop_last, sampler=sampler,
                                    num_workers=num_workers, pin_memory=device.type == "cuda",
                                    generator=torch.Generator().manual_seed(seed * RANK_SEED_STRIDE + epoch))
                stopping = False
                for images, labels in loader:
                    scheduler.step_update(step)
                    if rifle is not None and rifle.cyclic_lr:
                        optimizer.param_groups[-1]["lr"] = lr * rifle.head_lr_factor(step, total_steps)
                    images = images.to(device, non_blocking=True, memory_format=fmt)
                    labels = labels.to(device, non_blocking=True)
                    if disturb is not None:
                        labels = disturb(labels, step, dist.rank, world)
                    if step % steps_per_epoch == 0:
                        gap = objective.statistics_gap(images)
                    train_step(objective, optimizer, scaler, images, labels, sums)
                    step += 1
                    bar.update(1)
                    # Identical on every process: the generator is seeded by (seed, event).
                    if rifle is not None and rifle.after_step(step, optimizer) and primary:
                        _append_metrics(metrics_path, {"step": step, "event": "rifle"})
                    if step % log_every == 0 and not bar.disable:  # a host sync, at logging steps only
                        bar.set_postfix(loss=f"{(sums['loss'] / sums['count']).item():.3f}")
                    boundary = step >= total_steps or step % steps_per_epoch == 0
                    if not dist.enabled:
                        stopping = bool(stop)
                    elif boundary or step % sync_every == 0:
                        stopping = dist.any(bool(stop), device)
                    if stopping or boundary:
                        break
                epoch_done = step % steps_per_epoch == 0 or step >= total_steps
                if stopping and not epoch_done:
                    reduce_sums()
                    save()
                    raise Interrupted(f"interrupted at step {step}/{total_steps}; checkpoint saved in {run_dir}")
                if not epoch_done:
                    continue
                epoch = math.ceil(step / steps_per_epoch)
                row: dict[str, Any] = {"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"]}
                reduce_sums()
                if not torch.isfinite(sums["loss"]):  # one check per epoch: NaN and inf persist in the sum
                    kept = (f"{ckpt_path} keeps epoch {epoch - 1}" if epoch > 1 and os.path.isfile(ckpt_path)
                            else "no checkpoint was written")
                    raise DeltatlError(f"training diverged: the loss became {sums['loss'].item()} in epoch {epoch} "
                                       f"(by step {step}); {kept}. Lower --lr (or --alpha)")
                count = sums.pop("count")
                row.update({f"train/{k}": (v / count).item() for k, v in sums.items()})
                sums.clear()
                if gap is not None:  # rank 0's batch (a diagnostic, not averaged over processes)
                    row["delta/bn_gap"] = gap.item()
                    gap = None
                # Cheap (one norm per epoch) and what RIFLE's re-initialisations visibly reset.
                row["head/norm"] = head_module(bare).weight.detach().norm().item()
                if epoch % eval_every == 0 or step >= total_steps:
                    val = eval_split(val_set, "val")
                    row.update({f"val/{k}": v for k, v in val.items() if k != "n"})
                row["seconds"] = elapsed + time.perf_counter() - started
                if primary:
                    _append_metrics(metrics_path, row)
                save()
                if stopping:  # on an epoch's last step: that epoch is logged and validated first
                    raise Interrupted(f"interrupted at step {step}/{total_steps}; checkpoint saved in {run_dir}")
    except Interrupted:
        bar.close()
        dist.barrier()  # nobody exits (and makes torchrun stop the others) before rank 0 has saved
        raise
    bar.close()
    if not val:
        val = eval_split(val_set, "val")
    test = eval_split(test_set, "test")
    seconds = elapsed + time.perf_counter() - started
    summary = {**(run_info or {}),
               "val_top1": val.get("top1"), "val_loss": val.get("loss"),
               "test_top1": test.get("top1"), "test_loss": test.get("loss"),
               "epochs": epochs, "steps": total_steps, "train_images": n_train, "world_size": world,
               "seconds": round(seconds, 2)}
    save(done=True)
    if primary:
        with atomic_open(os.path.join(run_dir, SUMMARY)) as f:
            json.dump({k: _strict(v) for k, v in summary.items()}, f, indent=2, allow_nan=False)
    return summary
