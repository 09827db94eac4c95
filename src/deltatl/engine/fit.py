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
compilation; BENCHMARKS.md has what ``deltatl bench`` measured of each (bf16 is for GPUs and CPUs with
bf16 units: on CPUs without them it is several times slower than float32).

- ``amp="bf16"``: autocast the networks' forward passes (target, source) to bfloat16, no scaler.
  ``amp="fp16"``: float16 with a :class:`torch.amp.GradScaler` (its inf check syncs the host each
  step). Only the networks run under autocast (:func:`autocast_networks`): the logits come out in
  float32 and the cross-entropy and regularizer terms are computed outside autocast, in float32 (a
  blanket autocast would run DELTA's channel weighting, a matrix product, in low precision).
- ``channels_last``: the networks and the images in channels-last memory format (faster convolutions
  on CPUs and GPUs: BENCHMARKS.md; :func:`deltatl.run.use_channels_last` turns it on by default).
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
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

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
from ..seeds import SEED_STRIDE, derived_seed
from . import checkpoint as ckpt
from .evaluate import eval_loader, evaluate
from .hooks import StepContext, StepHook
from .objective import Objective
from .rifle import Rifle
from .tricks import DisturbLabel
from .schedule import create_schedule

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


@contextmanager
def autocast_networks(objective: Objective, device_type: str, dtype: torch.dtype) -> Iterator[Objective]:
    """``objective``'s forward with its networks under autocast inside the block (what ``fit`` does with
    ``amp``); the loss terms stay float32."""
    objective.prepare(device_type=device_type, amp_dtype=dtype)
    try:
        yield objective
    finally:
        objective.prepare()


def train_step(objective: Objective, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               images: Tensor, labels: Tensor, sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """One optimisation step exactly as :func:`fit` runs it (``deltatl bench`` times this function).

    Forward through the objective, backward (scaled for fp16), optimizer step, and the running sums
    of the logged terms accumulated on the device: no host synchronisation.
    """
    out = objective(images, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out["loss"]).backward()
    if objective.adds_gradients:  # terms outside autograd (--l2sp-fused), scaled as the others are
        objective.add_gradients_(scaler.get_scale() if scaler.is_enabled() else 1.0)
    scaler.step(optimizer)
    scaler.update()
    for key, value in out.items():
        if key != "logits":
            sums[key] += value.detach().double()
    sums["count"] += 1
    return out


class _EpochTagged(Sampler[tuple[int, int]]):
    """An :class:`EpochSampler` that can be moved to any epoch and step, each index tagged with its epoch.

    With the tag, a worker process that outlives its epoch (``persistent_workers``) still draws each
    image's augmentation for the right epoch (:class:`_EpochItems`)."""

    def __init__(self, sampler: EpochSampler):
        self.sampler = sampler

    def move_to(self, epoch: int, start: int) -> None:
        """From the ``start``-th (global) batch of ``epoch`` on."""
        self.sampler.epoch = epoch
        self.sampler.start = start * self.sampler.batch_size * self.sampler.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class _EpochItems(Dataset):
    """``dataset`` addressed by ``(epoch, index)``: the process that loads the item (a worker's copy of the
    dataset) is moved to that epoch first, so its augmentation is the epoch's whatever process it is."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        epoch, index = item
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
        return self.dataset[index]


def train_loader(train_set: Dataset, *, batch_size: int, seed: int, num_workers: int = 0,
                 device: torch.device = torch.device("cpu"), rank: int = 0, world_size: int = 1,
                 drop_last: bool = True) -> tuple[DataLoader, Callable[[int, int], None]]:
    """The training DataLoader of a whole run, as :func:`fit` reads it, and the function that moves it to
    ``(epoch, start)`` (the ``start``-th step of ``epoch``) before each ``iter()``.

    The order is :class:`EpochSampler`'s (a function of ``(seed, epoch)``; under DDP this process's slice
    of every global batch). Worker processes (``num_workers`` > 0) are started once and kept across
    epochs (up to 1.4x faster epochs of loading on this project's CPU, BENCHMARKS.md; on a GPU an epoch of
    a small dataset can take less than their start-up); each index carries its epoch, so a kept worker
    draws that epoch's augmentation, and the workers' own seeds never matter: each image's draws are
    seeded by ``(seed, epoch, index)`` (:class:`~deltatl.data.TransformedImages`). The loader has its own
    generator: a DataLoader draws its base seed from the global RNG otherwise, and a run resumed
    mid-epoch starts one more iterator than the uninterrupted run, which would shift every later
    dropout draw.
    """
    sampler = _EpochTagged(EpochSampler(len(train_set), seed, 0, batch_size=batch_size, rank=rank,  # type: ignore[arg-type]
                                        world_size=world_size))
    loader = DataLoader(_EpochItems(train_set), batch_size=batch_size, drop_last=drop_last, sampler=sampler,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))
    return loader, sampler.move_to


def make_optimizer(objective: Objective, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """The papers' SGD over the objective's parameter groups, named ``backbone`` and ``head`` (RIFLE's
    hook addresses the head's by name)."""
    return torch.optim.SGD(objective.param_groups(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def running_sums(device: torch.device) -> dict[str, Tensor]:
    """The per-epoch sums :func:`train_step` accumulates: float64 zeros on ``device``, created on demand."""
    return defaultdict(lambda: torch.zeros((), dtype=torch.float64, device=device))


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


@dataclass
class _Progress:
    """What the loop has done; everything here is in the checkpoint, so a resumed run continues exactly."""

    step: int = 0
    elapsed: float = 0.0  # seconds spent in earlier sessions
    gap: Tensor | None = None  # DELTA: the part of its term due to BatchNorm statistics, on an epoch's first batch
    val: dict[str, float] = field(default_factory=dict)  # the last validation


class _Loop:
    """One run of :func:`fit`: the training state and the steps of the loop, each a short method."""

    def __init__(self, objective: Objective, train_set: TransformedImages, *, run_dir: str, total_steps: int,
                 batch_size: int, lr: float, momentum: float, weight_decay: float, schedule: str,
                 decay_fraction: float, device: torch.device, seed: int, num_workers: int, log_every: int,
                 hooks: Sequence[StepHook], progress: bool, run_info: dict[str, Any] | None, dist: DistEnv,
                 amp: str, channels_last: bool, sync_every: int | None, lr_cycles: int, lr_min_factor: float,
                 tensorboard: bool = False):
        self.objective, self.train_set, self.run_dir, self.total_steps = objective, train_set, run_dir, total_steps
        self.batch_size, self.device, self.seed, self.num_workers = batch_size, device, seed, num_workers
        self.batches: tuple[DataLoader, Callable[[int, int], None]] | None = None  # see loader()
        self.eval_loaders: dict[str, DataLoader] = {}  # see evaluate()
        self.log_every, self.hooks, self.progress, self.run_info, self.dist = log_every, hooks, progress, run_info, dist
        self.primary, self.world = dist.is_primary, dist.world_size
        self.ckpt_path, self.metrics_path = os.path.join(run_dir, CHECKPOINT), os.path.join(run_dir, METRICS)
        self.n_train = len(train_set)
        if self.n_train == 0:
            raise DeltatlError("the training split is empty")
        if dist.enabled and self.n_train < batch_size * self.world:
            raise DeltatlError(f"the training split has {self.n_train} images, fewer than one global batch of "
                               f"{self.world} processes x {batch_size}: lower `batch_size`")
        if amp not in AMP_DTYPES:
            raise DeltatlError(f"unknown `amp` '{amp}' (choose from {', '.join(AMP_DTYPES)})")
        self.amp_dtype, self.channels_last = AMP_DTYPES[amp], channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.drop_last = self.n_train >= batch_size
        self.steps_per_epoch = epoch_steps(self.n_train, batch_size * self.world)
        self.epochs = math.ceil(total_steps / self.steps_per_epoch)
        self.sync_every = sync_every or (log_every if device.type == "cuda" else 1)
        if self.primary:
            os.makedirs(run_dir, exist_ok=True)

        # Process r seeds its global RNG (dropout) with seed + r * stride: the processes draw different
        # masks for their different images, and rank 0 draws those of a single-process run.
        ckpt.seed_everything(seed + SEED_STRIDE * dist.rank)
        objective.to(device)
        # Target, source, L2-SP starting point and attention: rank 0's on every process.
        dist.broadcast_module_(objective)
        if channels_last:
            objective.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(objective, lr, momentum, weight_decay)
        self.scheduler = create_schedule(self.optimizer, schedule, total_steps, self.steps_per_epoch, decay_fraction,
                                         cycles=lr_cycles, min_factor=lr_min_factor)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.sums = running_sums(device)
        self.state = _Progress()
        self.started = time.perf_counter()
        self.tensorboard = tensorboard and self.primary
        self.writer: Any = None

    # --- checkpoints ---------------------------------------------------------------------------------

    def restore(self, resume: bool) -> None:
        """Continue from the checkpoint (``resume``), or start afresh (an old metrics file removed)."""
        if not self.dist.broadcast_object(resume and os.path.isfile(self.ckpt_path)):
            if self.primary and os.path.isfile(self.metrics_path):
                os.remove(self.metrics_path)
            return
        state = ckpt.load(self.ckpt_path)
        if state.get("world_size", 1) != self.world:
            raise DeltatlError(f"{self.ckpt_path} was written by {state.get('world_size', 1)} process(es); resume "
                               f"it with as many (torchrun --nproc_per_node), not {self.world}")
        self.objective.model.load_state_dict(state["model"])
        self.objective.load_regularizer_state(state["regularizer"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.state = _Progress(state["step"], state["seconds"], state.get("bn_gap"))
        for k, v in state["epoch_sums"].items():
            self.sums[k] = v.to(self.device)
        ckpt.set_rng_state(state.get("rng_per_rank", [state["rng"]])[self.dist.rank])
        if self.primary:
            _truncate_metrics(self.metrics_path, self.state.step)

    def open_tensorboard(self) -> None:
        """The event writer (rank 0, ``--tensorboard``); events after a resumed step are purged."""
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.run_dir, purge_step=self.state.step or None)

    def log_events(self, row: dict[str, Any]) -> None:
        """An epoch's row (``metrics.jsonl``) as TensorBoard scalars, plus every group's learning rate."""
        if self.writer is None:
            return
        step = row["step"]
        for key, value in row.items():
            if key not in ("epoch", "step", "lr", "seconds", "event") and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        for group in self.optimizer.param_groups:
            self.writer.add_scalar(f"lr/{group.get('name', 'group')}", group["lr"], step)
        self.writer.flush()

    def seconds(self) -> float:
        return self.state.elapsed + time.perf_counter() - self.started

    def save(self, done: bool = False) -> None:
        """Collective (the RNG states of all processes are gathered); rank 0 writes."""
        rng = self.dist.gather_object(ckpt.rng_state())
        if not self.primary:
            return
        gap = self.state.gap
        state = {"model": self.bare.state_dict(), "regularizer": self.objective.regularizer_state(),
                 "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                 "step": self.state.step, "total_steps": self.total_steps, "seconds": self.seconds(),
                 "epoch_sums": {k: v.cpu() for k, v in self.sums.items()}, "rng": rng[0],
                 "bn_gap": None if gap is None else gap.cpu(),
                 "world_size": self.world, "run_info": self.run_info or {}, "done": done}
        if self.dist.enabled:
            state["rng_per_rank"] = rng
        ckpt.save_atomic(state, self.ckpt_path)

    def interrupted(self) -> Interrupted:
        return Interrupted(f"interrupted at step {self.state.step}/{self.total_steps}; checkpoint saved in "
                           f"{self.run_dir}")

    # --- networks ------------------------------------------------------------------------------------

    def wrap_networks(self, compile_model: bool, sync_bn: bool) -> nn.Module:
        """SyncBatchNorm, compilation and DDP, once; returns the network the steps run."""
        self.bare = bare = self.objective.model
        if sync_bn and self.dist.enabled:
            convert_sync_batchnorm(bare)
            if self.objective.source is not None:  # DELTA's source with batch statistics: global too
                convert_sync_batchnorm(self.objective.source)
        # Only the target network is compiled and wrapped; hooks, L2-SP and RIFLE hold its inner modules
        # and parameters, which neither wrapper replaces.
        net = torch.compile(bare) if compile_model else bare
        if self.dist.enabled:
            net = DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return net

    def evaluate(self, dataset: Dataset | None, name: str) -> dict[str, float]:
        if dataset is None or len(dataset) == 0:
            return {}
        if self.dist.enabled:  # DDP leaves each process with its own last BatchNorm update: use rank 0's
            self.dist.broadcast_tensors_(list(self.bare.buffers()))
        if name not in self.eval_loaders:  # the validation loader's workers are kept: it runs every epoch
            self.eval_loaders[name] = eval_loader(dataset, batch_size=self.batch_size, device=self.device,
                                                  num_workers=self.num_workers, dist=self.dist,
                                                  persistent=name == "val")
        return evaluate(self.bare, dataset, batch_size=self.batch_size, device=self.device, desc=name,
                        progress=self.progress, dist=self.dist, amp_dtype=self.amp_dtype,
                        channels_last=self.channels_last, loader=self.eval_loaders[name])

    # --- the loop ------------------------------------------------------------------------------------

    def loader(self, epoch: int, start: int) -> DataLoader:
        """The epoch's batches from its ``start``-th step on, from the one loader of the run."""
        if self.batches is None:
            self.batches = train_loader(self.train_set, batch_size=self.batch_size, seed=self.seed,
                                        num_workers=self.num_workers, device=self.device, rank=self.dist.rank,
                                        world_size=self.world, drop_last=self.drop_last)
        loader, move_to = self.batches
        move_to(epoch, start)
        return loader

    def context(self) -> StepContext:
        return StepContext(self.state.step, self.total_steps, self.optimizer, self.dist.rank, self.world)

    def train_one_epoch(self, stop: dict[str, int], bar: tqdm) -> bool:
        """Steps until the epoch ends (or the run does, or a signal asks to stop); returns whether to stop."""
        epoch, start = divmod(self.state.step, self.steps_per_epoch)
        self.train_set.set_epoch(epoch)
        self.objective.train()  # again after each evaluation, which put the model in eval mode
        stopping = False
        for images, labels in self.loader(epoch, start):
            step = self.state.step
            self.scheduler.step_update(step)
            before = self.context()
            for hook in self.hooks:
                hook.before_step(before)
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            labels = labels.to(self.device, non_blocking=True)
            for hook in self.hooks:
                labels = hook.labels(before, labels)
            if step % self.steps_per_epoch == 0:
                self.state.gap = self.objective.statistics_gap(images)
            train_step(self.objective, self.optimizer, self.scaler, images, labels, self.sums)
            self.state.step = step = step + 1
            bar.update(1)
            after = self.context()
            for hook in self.hooks:  # identical on every process: hooks are functions of the step
                event = hook.after_step(after)
                if event and self.primary:
                    _append_metrics(self.metrics_path, {"step": step, "event": event})
                    if self.writer is not None:
                        self.writer.add_scalar(f"events/{event}", 1, step)
            if step % self.log_every == 0 and not bar.disable:  # a host sync, at logging steps only
                bar.set_postfix(loss=f"{(self.sums['loss'] / self.sums['count']).item():.3f}")
            boundary = step >= self.total_steps or step % self.steps_per_epoch == 0
            if not self.dist.enabled:
                stopping = bool(stop)
            elif boundary or step % self.sync_every == 0:
                stopping = self.dist.any(bool(stop), self.device)
            if stopping or boundary:
                break
        return stopping

    def reduce_sums(self) -> None:
        """Collective: every running sum becomes the mean of the processes' (the count is the same)."""
        if self.dist.enabled and self.sums:
            keys = sorted(self.sums)
            packed = self.dist.all_reduce_sum_(torch.stack([self.sums[k] for k in keys])) / self.world
            self.sums.update(zip(keys, packed.unbind()))

    def end_epoch(self, val_set: Dataset | None, eval_every: int) -> None:
        """Log the epoch's means (refusing a non-finite loss), validate when due, checkpoint."""
        step = self.state.step
        epoch = math.ceil(step / self.steps_per_epoch)
        row: dict[str, Any] = {"epoch": epoch, "step": step, "lr": self.optimizer.param_groups[0]["lr"]}
        self.reduce_sums()
        if not torch.isfinite(self.sums["loss"]):  # one check per epoch: NaN and inf persist in the sum
            kept = (f"{self.ckpt_path} keeps epoch {epoch - 1}" if epoch > 1 and os.path.isfile(self.ckpt_path)
                    else "no checkpoint was written")
            raise DeltatlError(f"training diverged: the loss became {self.sums['loss'].item()} in epoch {epoch} "
                               f"(by step {step}); {kept}. Lower `lr` (or `alpha`)")
        count = self.sums.pop("count")
        row.update({f"train/{k}": (v / count).item() for k, v in self.sums.items()})
        self.sums.clear()
        if self.state.gap is not None:  # rank 0's batch (a diagnostic, not averaged over processes)
            row["delta/bn_gap"] = self.state.gap.item()
            self.state.gap = None
        # Cheap (one norm per epoch) and what RIFLE's re-initialisations visibly reset.
        row["head/norm"] = head_module(self.bare).weight.detach().norm().item()
        if epoch % eval_every == 0 or step >= self.total_steps:
            self.state.val = self.evaluate(val_set, "val")
            row.update({f"val/{k}": v for k, v in self.state.val.items() if k != "n"})
        row["seconds"] = self.seconds()
        if self.primary:
            _append_metrics(self.metrics_path, row)
            self.log_events(row)
        self.save()

    def run(self, net: nn.Module, val_set: Dataset | None, eval_every: int) -> None:
        """Epochs until ``total_steps``; on a signal, checkpoint and raise :class:`Interrupted`."""
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=None if self.progress and self.primary else True)
        try:
            # chosen once for the run: the compiled / DDP-wrapped target, both networks under autocast
            self.objective.prepare(net, self.device.type, self.amp_dtype)
            with _stop_on_signals() as stop:
                while self.state.step < self.total_steps:
                    stopping = self.train_one_epoch(stop, bar)
                    step = self.state.step
                    if step % self.steps_per_epoch == 0 or step >= self.total_steps:
                        self.end_epoch(val_set, eval_every)  # an epoch's last step: logged and validated first
                    elif stopping:
                        self.reduce_sums()
                        self.save()
                    if stopping:
                        raise self.interrupted()
        except Interrupted:
            bar.close()
            self.dist.barrier()  # nobody exits (and makes torchrun stop the others) before rank 0 has saved
            raise
        finally:
            self.objective.prepare()  # the bare networks again
            self.batches = None  # its worker processes end with it
        bar.close()

    def finish(self, val_set: Dataset | None, test_set: Dataset | None) -> dict[str, Any]:
        """The final model's validation (if not just done) and test scores; ``summary.json``."""
        val = self.state.val or self.evaluate(val_set, "val")
        test = self.evaluate(test_set, "test")
        self.eval_loaders.clear()  # their worker processes end here
        summary = {**(self.run_info or {}),
                   "val_top1": val.get("top1"), "val_loss": val.get("loss"),
                   "test_top1": test.get("top1"), "test_loss": test.get("loss"),
                   "epochs": self.epochs, "steps": self.total_steps, "train_images": self.n_train,
                   "world_size": self.world, "seconds": round(self.seconds(), 2)}
        self.save(done=True)
        if self.primary:
            with atomic_open(os.path.join(self.run_dir, SUMMARY)) as f:
                json.dump({k: _strict(v) for k, v in summary.items()}, f, indent=2, allow_nan=False)
        if self.writer is not None:
            hparams = {k: v for k, v in ((self.run_info or {}).get("config") or {}).items()
                       if isinstance(v, (int, float, str, bool))}
            metrics = {f"hparam/{k}": summary[k] for k in ("val_top1", "test_top1") if summary.get(k) is not None}
            self.writer.add_hparams(hparams, metrics, run_name="hparams")
            self.writer.close()
        return summary


def fit(objective: Objective, train_set: TransformedImages, val_set: Dataset | None, test_set: Dataset | None,
        *, run_dir: str, total_steps: int, batch_size: int, lr: float, momentum: float = 0.9,
        weight_decay: float = 0.0, schedule: str = "step", decay_fraction: float = 2 / 3,
        device: torch.device = torch.device("cpu"), seed: int = 0, num_workers: int = 0, eval_every: int = 1,
        log_every: int = 10, rifle: Rifle | None = None, resume: bool = False, progress: bool = True,
        run_info: dict[str, Any] | None = None, dist: DistEnv = SINGLE, amp: str = "none",
        channels_last: bool = False, compile_model: bool = False, sync_bn: bool = False,
        sync_every: int | None = None, lr_cycles: int = 1, lr_min_factor: float = 0.0,
        disturb: DisturbLabel | None = None, hooks: Sequence[StepHook] = (),
        tensorboard: bool = False) -> dict[str, Any]:
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
        hooks: further step hooks (:mod:`deltatl.engine.hooks`), after ``disturb`` and ``rifle``.
        tensorboard: also write TensorBoard events in ``run_dir`` (rank 0): every logged scalar at its
            step, each parameter group's learning rate (``lr/<group>``), hooks' events
            (``events/rifle``), and the run's settings with its final scores as hparams.
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
    all_hooks = [hook for hook in (disturb, rifle) if hook is not None] + list(hooks)
    loop = _Loop(objective, train_set, run_dir=run_dir, total_steps=total_steps, batch_size=batch_size, lr=lr,
                 momentum=momentum, weight_decay=weight_decay, schedule=schedule, decay_fraction=decay_fraction,
                 device=device, seed=seed, num_workers=num_workers, log_every=log_every, hooks=all_hooks,
                 progress=progress, run_info=run_info, dist=dist, amp=amp, channels_last=channels_last,
                 sync_every=sync_every, lr_cycles=lr_cycles, lr_min_factor=lr_min_factor, tensorboard=tensorboard)
    loop.restore(resume)
    loop.open_tensorboard()
    net = loop.wrap_networks(compile_model, sync_bn)
    loop.run(net, val_set, eval_every)
    try:
        return loop.finish(val_set, test_set)
    except KeyboardInterrupt:  # the training is in the checkpoint: --resume only evaluates
        raise Interrupted(f"interrupted during the final evaluation; the trained model is saved in {run_dir}") from None
