"""Learning-rate schedules over optimisation steps, built on timm's schedulers.

- ``step``: divide by 10 once, after ``decay_fraction`` of training (paper: after 6000 of 9000 iterations).
- ``exp``: multiply by a constant every epoch so the rate is /10 at ``decay_fraction`` of training
  (the ExponentialLR alternative of the paper's Figure 2).
- ``cosine``: cosine annealing to 0 over the whole run.
- ``constant``.
- ``cosine-restarts`` and ``triangular``: cyclic learning rates (one of the tricks RIFLE was compared
  with), ``cycles`` equal cycles over the run, between ``lr * min_factor`` and ``lr``. ``cosine-restarts``
  (SGDR, Loshchilov & Hutter 2017) starts each cycle at ``lr`` and anneals it; ``triangular`` (Smith
  2017, the paper RIFLE cites) rises linearly from the floor to ``lr`` at mid-cycle and falls back. The
  cycle boundaries are the steps ``round(i * total / cycles)``, those of RIFLE's re-initialisations in
  an iteration-based run with ``--rifle cycles-1``.

The schedulers are pure functions of the step (``step_update(step)``), so resuming needs no state.
"""
from __future__ import annotations

import math

from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch.optim import Optimizer

from ..errors import DeltatlError

SCHEDULES = ("step", "exp", "cosine", "constant", "cosine-restarts", "triangular")
CYCLIC = ("cosine-restarts", "triangular")


class CyclicLRScheduler(Scheduler):
    """``cycles`` equal cycles over ``total_steps``; the factor of the base lr is a function of the step."""

    def __init__(self, optimizer: Optimizer, shape: str, total_steps: int, cycles: int, min_factor: float = 0.0):
        if shape not in CYCLIC:
            raise DeltatlError(f"unknown cyclic schedule '{shape}' (choose from {', '.join(CYCLIC)})")
        if not 1 <= cycles <= total_steps:
            raise DeltatlError(f"`lr_cycles` {cycles} must be between 1 and the {total_steps} training steps")
        self.shape, self.total_steps, self.cycles, self.min_factor = shape, total_steps, cycles, min_factor
        super().__init__(optimizer, param_group_field="lr", t_in_epochs=False)

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rate at ``step`` (0-based), in ``[min_factor, 1]``."""
        bounds = [round(i * self.total_steps / self.cycles) for i in range(self.cycles + 1)]
        for start, stop in zip(bounds, bounds[1:]):
            if start <= step < stop:
                u = (step - start) / (stop - start)  # position in the cycle, [0, 1)
                break
        else:
            u = 1.0  # past the end (never trained): the end of the last cycle
        high = 0.5 * (1 + math.cos(math.pi * u)) if self.shape == "cosine-restarts" else 1 - abs(2 * u - 1)
        return self.min_factor + (1 - self.min_factor) * high

    def _get_lr(self, t: int) -> list[float]:
        return [base * self.factor(t) for base in self.base_values]


def step_decay_at(total_steps: int, decay_fraction: float) -> int:
    """The step after which the ``step`` schedule divides the learning rate by 10."""
    return max(1, round(decay_fraction * total_steps))


def create_schedule(optimizer: Optimizer, name: str, total_steps: int, steps_per_epoch: int,
                    decay_fraction: float = 2 / 3, cycles: int = 1, min_factor: float = 0.0) -> Scheduler:
    """The scheduler ``name`` (see the module docstring); ``cycles`` and ``min_factor`` are those of the
    cyclic schedules, ``decay_fraction`` that of ``step`` and ``exp``."""
    if name in CYCLIC:
        return CyclicLRScheduler(optimizer, name, total_steps, cycles, min_factor)
    if name == "step":
        return StepLRScheduler(optimizer, decay_t=step_decay_at(total_steps, decay_fraction),
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
