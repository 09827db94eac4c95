"""Distributed data parallel (DDP) under ``torchrun``: the process group and rank-aware helpers.

Launch::

    torchrun --standalone --nproc_per_node 4 -m deltatl train --method delta --batch-size 16 ...

Distributed mode is detected from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``); there are no flags for it. The backend is NCCL on CUDA (one device
per process, ``cuda:LOCAL_RANK``) and gloo on the CPU. What each part of a run does under DDP:

- ``--batch-size`` is the batch of *one process*; a step consumes a global batch of
  ``WORLD_SIZE x --batch-size`` images, and an epoch has ``len(train) // global batch`` steps. Each
  process takes its own slice of every global batch of the single-process order (see
  :class:`deltatl.engine.fit.EpochSampler`), so N processes with ``--batch-size b`` see, step by step,
  the same images as one process with ``--batch-size N*b``.
- BatchNorm normalises with the statistics of each process's slice (DDP's default). With
  ``--sync-bn`` it uses the statistics of the global batch (:func:`convert_sync_batchnorm`); only then
  is a step exactly the single-process step on the global batch.
- Only the target network is wrapped in ``DistributedDataParallel``; the frozen source network, the
  L2-SP starting point and the channel attention are plain tensors, identical on every process
  (broadcast from rank 0 once). Checkpoints hold the unwrapped network (no ``module.`` prefix).
- Evaluation is exact: every process scores a disjoint, unpadded shard and the sums are all-reduced.
- Channel attention is computed once, on rank 0; the other processes wait and receive the scores.
- Only rank 0 writes files (config, split lists, metrics, checkpoints, summary) and shows progress.

Rank 0 may work alone for a while (the channel attention's L2-FE fit) while the others wait in a
collective; the process-group timeout is therefore long: ``DELTATL_DIST_TIMEOUT_MIN`` minutes
(default 120).
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import DeltatlError

T = TypeVar("T")

TIMEOUT_ENV = "DELTATL_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 120.0


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job; ``world_size == 1`` is a plain single-process run.

    Every method is a no-op (or the identity) in a single-process run, so callers need no branches.
    Methods marked *collective* must be called by every process, in the same order.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    def barrier(self) -> None:
        """Collective: wait for every process."""
        if self.enabled:
            dist.barrier()

    def all_reduce_sum_(self, tensor: Tensor) -> Tensor:
        """Collective: sum ``tensor`` over the processes, in place; returns it."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def mean_gradient(self, grad: Tensor) -> Tensor:
        """Collective (inside the backward): ``grad`` averaged over the processes, as DDP averages the
        wrapped network's; for trained parameters outside it (LwF's source head). Registered as a
        parameter hook by :class:`deltatl.engine.objective.Objective`."""
        if not self.enabled:
            return grad
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad / self.world_size

    def gather_batch(self, tensor: Tensor) -> Tensor:
        """Collective, differentiable: the processes' equal-sized batches concatenated in rank order
        (the single-process global batch, as :class:`deltatl.engine.fit.EpochSampler` slices it).

        For a term of the whole global batch that every process computes alike (BSS's singular values):
        the backward sums every process's gradient for this process's rows, so after DDP averages the
        parameter gradients the step is the single-process step on the global batch.
        """
        return _AllGather.apply(tensor) if self.enabled else tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """Collective: whether ``flag`` is true on at least one process (one small all-reduce; on a
        CUDA device this waits for the queued work, so call it where the loop syncs anyway)."""
        if not self.enabled:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def broadcast_object(self, obj: T) -> T:
        """Collective: rank 0's ``obj`` on every process (pickled; for small objects)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_primary else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, obj: Any) -> list[Any] | None:
        """Collective: ``[obj of rank 0, obj of rank 1, ...]`` on rank 0, None elsewhere."""
        if not self.enabled:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_primary else None
        dist.gather_object(obj, out, dst=0)
        return out

    def on_rank0(self, fn: Callable[[], T]) -> T:
        """Collective: run ``fn`` on rank 0 only and return its result on every process.

        An exception on rank 0 is re-raised there and raised with the same message on the other ranks
        (as its own class if a :class:`DeltatlError`, e.g. :class:`~deltatl.errors.RunInUse`, else as a
        :class:`DeltatlError`), so no process is left waiting in a later collective.
        """
        if not self.enabled:
            return fn()
        result: Any = None
        error: BaseException | None = None
        if self.is_primary:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others know
                error = exc
        message = str(error) if isinstance(error, DeltatlError) else (
            None if error is None else f"rank 0 failed: {type(error).__name__}: {error}")
        kind = type(error) if isinstance(error, DeltatlError) else DeltatlError
        message, kind, result = self.broadcast_object((message, kind, result if error is None else None))
        if error is not None:
            raise error
        if message is not None:
            raise kind(message)
        return result

    def broadcast_tensors_(self, tensors: list[Tensor]) -> None:
        """Collective: overwrite ``tensors`` in place with rank 0's values."""
        if not self.enabled:
            return
        for tensor in tensors:
            if tensor.is_contiguous():
                dist.broadcast(tensor, src=0)
            else:  # e.g. channels_last: the collectives want dense row-major memory
                dense = tensor.contiguous()
                dist.broadcast(dense, src=0)
                tensor.copy_(dense)

    def broadcast_module_(self, module: nn.Module) -> None:
        """Collective: make every parameter and buffer of ``module`` equal to rank 0's (in place, so
        optimizers and hooks keep their references)."""
        with torch.no_grad():
            self.broadcast_tensors_([*module.parameters(), *module.buffers()])


SINGLE = DistEnv()


def is_primary_process() -> bool:
    """Rank 0 of the process group, or of torchrun's environment before the group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return world_from_env()[0] == 0


def world_from_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's variables; ``(0, 1, 0)`` without them."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise DeltatlError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None
    return rank, world, local


def init_from_env(device: torch.device) -> tuple[DistEnv, torch.device]:
    """Join the process group torchrun describes (once per process) and choose this process's device.

    Without torchrun's variables, or with ``WORLD_SIZE=1``, nothing is initialised and
    ``(SINGLE, device)`` is returned. On CUDA each process uses ``cuda:LOCAL_RANK``.

    Raises:
        DeltatlError: DDP was asked for on a device it does not support (MPS), or there are fewer CUDA
            devices than local processes.
    """
    rank, world, local = world_from_env()
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    if world <= 1:
        return SINGLE, device
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise DeltatlError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s): "
                               f"use at most that many processes per node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise DeltatlError(f"distributed training runs on cuda or cpu, not {device.type}: use `device` cpu")
    if not dist.is_available():
        raise DeltatlError("this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        minutes = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_MIN))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=minutes))
        atexit.register(_destroy)
    return DistEnv(rank=rank, world_size=world, local_rank=local), device


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --- synchronised BatchNorm that also works on the CPU (gloo) ----------------------------------------

class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over the processes: the gradient of a sum of per-process losses with respect
    to each process's input is the sum of the incoming gradients (all-reduced again)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:  # noqa: D102
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # noqa: D102
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class _AllGather(torch.autograd.Function):
    """``cat`` of every process's tensor (same shape everywhere); the gradient of this process's rows is
    the sum over the processes of the incoming gradients for them."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:  # noqa: D102
        parts = [torch.empty_like(tensor, memory_format=torch.contiguous_format)
                 for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows, ctx.rank = tensor.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # noqa: D102
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def _global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    r"""Batch normalisation with the statistics of the *global* batch (all processes), differentiable.

    Two all-reduces of per-channel sums (mean, then the centred second moment; float32, no
    :math:`E[x^2]-E[x]^2` cancellation). Their backward sums the gradients of the statistics over the
    processes, so (DDP then averaging the parameter gradients) the gradient is that of the
    single-process BatchNorm on the global batch. Running statistics are updated as ``F.batch_norm``
    does (unbiased variance).
    """
    all_reduce = _AllReduceSum.apply
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    xf = x.float()
    count = torch.tensor([xf.numel() // xf.shape[1]], dtype=torch.float32, device=x.device)
    stats = all_reduce(torch.cat([xf.sum(dim=dims), count]))
    total = stats[-1]
    mean = stats[:-1] / total
    centred = xf - mean.view(shape)
    var = all_reduce(centred.square().sum(dim=dims)) / total
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.float().view(shape) + bn.bias.float().view(shape)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            n = float(total)
            bn.running_mean.mul_(1 - factor).add_(mean.detach().to(bn.running_mean.dtype), alpha=factor)
            unbiased = var.detach() * (n / max(n - 1, 1.0))
            bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)
    return y.to(x.dtype)


def _syncing(module: nn.Module) -> bool:
    return module.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _SyncBatchNormMixin:
    """Global-batch statistics in training mode under an initialised process group; else unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        if not _syncing(self):  # type: ignore[arg-type]
            return super().forward(x)  # type: ignore[misc]
        y = _global_batch_norm(self, x)  # type: ignore[arg-type]
        if hasattr(self, "drop"):  # timm BatchNormAct2d: norm, then dropout, then activation
            y = self.drop(y)
        if hasattr(self, "act"):
            y = self.act(y)
        return y


class SyncBatchNorm1d(_SyncBatchNormMixin, nn.BatchNorm1d):
    pass


class SyncBatchNorm2d(_SyncBatchNormMixin, nn.BatchNorm2d):
    pass


class SyncBatchNorm3d(_SyncBatchNormMixin, nn.BatchNorm3d):
    pass


try:
    from timm.layers import BatchNormAct2d as _BatchNormAct2d
except ImportError:  # pragma: no cover - timm is a dependency
    _BatchNormAct2d = None

if _BatchNormAct2d is not None:
    class SyncBatchNormAct2d(_SyncBatchNormMixin, _BatchNormAct2d):
        pass

_SYNC_CLASSES: dict[type, type] = {nn.BatchNorm1d: SyncBatchNorm1d, nn.BatchNorm2d: SyncBatchNorm2d,
                                   nn.BatchNorm3d: SyncBatchNorm3d}
if _BatchNormAct2d is not None:
    _SYNC_CLASSES[_BatchNormAct2d] = SyncBatchNormAct2d


def convert_sync_batchnorm(model: nn.Module) -> int:
    """Make the BatchNorm layers of ``model`` use global-batch statistics under DDP, in place.

    Unlike ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` this keeps every module object (only its
    class changes), so forward hooks on BatchNorm layers (DELTA taps some), parameters held by the
    optimizer and the L2-SP starting point all stay valid, and the state dict keys do not change. It
    runs on any device and backend (gloo included), and normalises exactly like the module it
    replaces outside training or without a process group.

    Returns:
        The number of converted layers.

    Raises:
        DeltatlError: a BatchNorm subclass it does not know (its forward may do more than normalise).
    """
    converted = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(module, _SyncBatchNormMixin):
            continue
        target = _SYNC_CLASSES.get(type(module))
        if target is None:
            raise DeltatlError(f"`sync_bn`: cannot synchronise layer {name!r} of type "
                               f"{type(module).__name__}")
        module.__class__ = target
        converted += 1
    return converted
