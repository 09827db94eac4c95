"""Learning-rate schedules over optimisation steps, built on timm's schedulers.

- ``step``: divide by 10 once, after ``decay_fraction`` of training (paper: after 6000 of 9000 iterations).
- ``exp``: multiply by a constant every epoch so the rate is /10 at ``decay_fraction`` of training
  (the ExponentialLR alternative of the paper's Figure 2).
- ``cosine``: cosine annealing to 0 over the whole run.
- ``constant``.

The schedulers are pure functions of the step (``step_update(step)``), so resuming needs no state.
"""
from __future__ import annotations

import math

from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch.optim import Optimizer

from ..errors import DeltatlError

SCHEDULES = ("step", "exp", "cosine", "constant")


def create_schedule(optimizer: Optimizer, name: str, total_steps: int, steps_per_epoch: int,
                    decay_fraction: float = 2 / 3) -> Scheduler:
    if name == "step":
        return StepLRScheduler(optimizer, decay_t=max(1, round(decay_fraction * total_steps)),
                               decay_rate=0.1, t_in_epochs=False)
    if name == "exp":
        epochs_to_tenth = max(decay_fraction * total_steps / steps_per_epoch, 1e-9)
        return StepLRScheduler(optimizer, decay_t=steps_per_epoch,
                               decay_rate=math.pow(0.1, 1 / epochs_to_tenth), t_in_epochs=False)
    if name == "cosine":
        return CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=0.0, t_in_epochs=False)
    if name == "constant":
        return StepLRScheduler(optimizer, decay_t=total_steps + 1, decay_rate=1.0, t_in_epochs=False)
    raise DeltatlError(f"unknown schedule '{name}' (choose from {', '.join(SCHEDULES)})")
