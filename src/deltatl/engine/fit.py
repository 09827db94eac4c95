"""``fit()``: the one training loop, used by the CLI, the tests and the searches.

It owns the epochs, the learning-rate schedule, evaluation, ``metrics.jsonl``, checkpoints and resuming.
A run interrupted by SIGINT or SIGTERM stops after the current step, writes a checkpoint and raises
:class:`Interrupted`; ``fit(..., resume=True)`` then continues and reaches exactly the result of an
uninterrupted run (same data order, same augmentation draws, same dropout draws).
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
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from ..data import TransformedImages
from ..errors import DeltatlError
from . import checkpoint as ckpt
from .evaluate import evaluate
from .objective import Objective
from .rifle import Rifle
from .schedule import create_schedule

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


class Interrupted(Exception):
    """Training stopped on a signal; the checkpoint on disk resumes it."""


class EpochSampler(Sampler[int]):
    """A random permutation that depends only on ``(seed, epoch)``, read from position ``start``."""

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0):
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return iter(order[self.start:].tolist())

    def __len__(self) -> int:
        return self.n - self.start


def epoch_steps(n_train: int, batch_size: int) -> int:
    """Steps in one epoch: full batches only (BatchNorm must never see a batch of one)."""
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


def _append_metrics(path: str, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _truncate_metrics(path: str, last_step: int) -> None:
    """Drop rows written after the checkpoint a resumed run starts from (they will be redone)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= last_step]
    with open(f"{path}.tmp", "w") as f:
        f.writelines(rows)
    os.replace(f"{path}.tmp", path)


def fit(objective: Objective, train_set: TransformedImages, val_set: Dataset | None, test_set: Dataset | None,
        *, run_dir: str, total_steps: int, batch_size: int, lr: float, momentum: float = 0.9,
        weight_decay: float = 0.0, schedule: str = "step", decay_fraction: float = 2 / 3, device: torch.device = torch.device("cpu"),
        seed: int = 0, num_workers: int = 0, eval_every: int = 1, log_every: int = 10,
        rifle: Rifle | None = None, resume: bool = False, progress: bool = True,
        run_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``objective`` with SGD for ``total_steps`` steps and evaluate it.

    Validation accuracy is measured every ``eval_every`` epochs and at the end; the test set is
    evaluated exactly once, at the end, on the final model (never used for any choice).

    Args:
        run_dir: where ``checkpoint.pt``, ``metrics.jsonl`` and ``summary.json`` are written.
        total_steps: optimisation steps; an epoch is ``len(train_set) // batch_size`` steps (the last
            incomplete batch is dropped so BatchNorm never sees a batch of one).
        decay_fraction: where the step schedule divides the rate by 10 (exp: where it reaches /10).
        rifle: re-initialise the head at the given steps (RIFLE); see :mod:`deltatl.engine.rifle`.
        run_info: stored in the checkpoint and the summary (method, model, classes, config...).

    Returns:
        The summary: ``val_top1``, ``test_top1`` (percent), losses, ``epochs``, ``steps``, ``seconds``.
    """
    os.makedirs(run_dir, exist_ok=True)
    ckpt_path, metrics_path = os.path.join(run_dir, CHECKPOINT), os.path.join(run_dir, METRICS)
    n_train = len(train_set)
    if n_train == 0:
        raise DeltatlError("the training split is empty")
    drop_last = n_train >= batch_size
    steps_per_epoch = epoch_steps(n_train, batch_size)
    epochs = math.ceil(total_steps / steps_per_epoch)

    ckpt.seed_everything(seed)
    objective.to(device)
    # The head is the last parameter group, so RIFLE's cyclic schedule can address it alone.
    optimizer = torch.optim.SGD(objective.param_groups(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = create_schedule(optimizer, schedule, total_steps, steps_per_epoch, decay_fraction)
    step, elapsed = 0, 0.0
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64, device=device))
    if resume and os.path.isfile(ckpt_path):
        state = ckpt.load(ckpt_path)
        objective.model.load_state_dict(state["model"])
        objective.load_regularizer_state(state["regularizer"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["seconds"]
        for k, v in state["epoch_sums"].items():
            sums[k] = v.to(device)
        ckpt.set_rng_state(state["rng"])
        _truncate_metrics(metrics_path, step)
    elif os.path.isfile(metrics_path):
        os.remove(metrics_path)

    def save(done: bool = False) -> None:
        ckpt.save_atomic({"model": objective.model.state_dict(), "regularizer": objective.regularizer_state(),
                          "optimizer": optimizer.state_dict(),
                          "step": step, "seconds": elapsed + time.perf_counter() - started,
                          "epoch_sums": {k: v.cpu() for k, v in sums.items()}, "rng": ckpt.rng_state(),
                          "run_info": run_info or {}, "done": done}, ckpt_path)

    def eval_split(dataset: Dataset | None, name: str) -> dict[str, float]:
        if dataset is None or len(dataset) == 0:
            return {}
        return evaluate(objective.model, dataset, batch_size=batch_size, device=device,
                        num_workers=num_workers, desc=name, progress=progress)

    started = time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=None if progress else True,
               dynamic_ncols=True)
    val: dict[str, float] = {}
    with _stop_on_signals() as stop:
        while step < total_steps:
            epoch, start = divmod(step, steps_per_epoch)
            train_set.set_epoch(epoch)
            objective.train()  # again after each evaluation, which put the model in eval mode
            loader = DataLoader(train_set, batch_size=batch_size, drop_last=drop_last,
                                sampler=EpochSampler(n_train, seed, epoch, start * batch_size),
                                num_workers=num_workers, pin_memory=device.type == "cuda")
            for images, labels in loader:
                scheduler.step_update(step)
                if rifle is not None and rifle.cyclic_lr:
                    optimizer.param_groups[-1]["lr"] = lr * rifle.head_lr_factor(step, total_steps)
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                out = objective(images, labels)
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                optimizer.step()
                for key, value in out.items():
                    if key != "logits":
                        sums[key] += value.detach().double()
                sums["count"] += 1
                step += 1
                bar.update(1)
                if rifle is not None and rifle.after_step(step, optimizer):
                    _append_metrics(metrics_path, {"step": step, "event": "rifle"})
                if step % log_every == 0:  # the only host sync of the hot loop
                    bar.set_postfix(loss=f"{(sums['loss'] / sums['count']).item():.3f}")
                if stop or step >= total_steps or step % steps_per_epoch == 0:
                    break
            if stop:
                save()
                bar.close()
                raise Interrupted(f"interrupted at step {step}/{total_steps}; checkpoint saved in {run_dir}")
            epoch_done = step % steps_per_epoch == 0 or step >= total_steps
            if not epoch_done:
                continue
            epoch = math.ceil(step / steps_per_epoch)
            row: dict[str, Any] = {"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"]}
            count = sums.pop("count")
            row.update({f"train/{k}": (v / count).item() for k, v in sums.items()})
            sums.clear()
            if epoch % eval_every == 0 or step >= total_steps:
                val = eval_split(val_set, "val")
                row.update({f"val/{k}": v for k, v in val.items() if k != "n"})
            row["seconds"] = elapsed + time.perf_counter() - started
            _append_metrics(metrics_path, row)
            save()
    bar.close()
    if not val:
        val = eval_split(val_set, "val")
    test = eval_split(test_set, "test")
    seconds = elapsed + time.perf_counter() - started
    summary = {**(run_info or {}),
               "val_top1": val.get("top1"), "val_loss": val.get("loss"),
               "test_top1": test.get("top1"), "test_loss": test.get("loss"),
               "epochs": epochs, "steps": total_steps, "train_images": n_train, "seconds": round(seconds, 2)}
    save(done=True)
    tmp = os.path.join(run_dir, f"{SUMMARY}.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(run_dir, SUMMARY))
    return summary
