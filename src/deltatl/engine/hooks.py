"""Step hooks: what changes the training loop's steps without being part of the loss.

RIFLE (re-initialise the head, its own learning rate) and DisturbLabel (noisy labels) are hooks. The
loop calls, for every step, ``before_step`` (after the schedule has set the learning rates), then
``labels`` on the batch's labels, and after the optimizer step ``after_step``, whose returned event
name (if any) is logged in ``metrics.jsonl``. Hooks must be deterministic functions of the step (and
of seeds they own): a resumed run and every DDP process must do exactly what one uninterrupted
process does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class StepContext:
    """Where the loop is. ``step`` counts the steps done before this one (``after_step``: including it)."""

    step: int
    total_steps: int
    optimizer: torch.optim.Optimizer
    rank: int = 0
    world_size: int = 1


class StepHook:
    """No-op defaults; a hook overrides what it needs."""

    def before_step(self, context: StepContext) -> None:
        pass

    def labels(self, context: StepContext, labels: Tensor) -> Tensor:
        return labels

    def after_step(self, context: StepContext) -> str | None:
        return None


def param_group(optimizer: torch.optim.Optimizer, name: str) -> dict:
    """The optimizer's parameter group called ``name`` (``backbone``, ``head``)."""
    for group in optimizer.param_groups:
        if group.get("name") == name:
            return group
    raise KeyError(f"no parameter group named {name!r} (have {[g.get('name') for g in optimizer.param_groups]})")
