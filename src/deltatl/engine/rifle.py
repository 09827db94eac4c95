"""RIFLE (ICML 2020): re-initialise the final linear layer periodically during fine-tuning.

Training is cut into ``K + 1`` equal periods and the head is re-initialised at the end of every period
but the last (the official code also re-initialised after the last epoch, returning a random head:
a bug that is not reproduced). Re-initialisation is the head's default initialisation, in place, so
the optimizer and DDP keep referring to the same Parameter objects, and it draws from a generator
seeded by ``(seed, event)``, so every process of a distributed run draws the same head.

Faithful default: the head's momentum buffers and learning rate are left as they are (as in the
official code). Switches: ``reset_momentum`` clears the head's optimizer state at each re-init;
``cyclic_lr`` gives the head a cosine learning rate that restarts at every re-init.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DeltatlError
from ..models import init_head_


def rifle_steps(total_steps: int, times: int, steps_per_epoch: int | None = None) -> list[int]:
    """The steps after which the head is re-initialised.

    With ``steps_per_epoch`` the events fall on epoch boundaries (periods of whole epochs, as the
    official code); otherwise on iterations.
    """
    if times < 0:
        raise DeltatlError("--rifle must be >= 0")
    if times == 0:
        return []
    unit = steps_per_epoch if steps_per_epoch and total_steps % steps_per_epoch == 0 else 1
    units = total_steps // unit
    if times >= units:
        raise DeltatlError(f"--rifle {times} needs more than {times} {'epochs' if unit > 1 else 'steps'}")
    events = [unit * round(units * i / (times + 1)) for i in range(1, times + 1)]
    if len(set(events)) != times or events[0] <= 0:
        raise DeltatlError(f"cannot space {times} re-initialisations over {units} periods")
    return events


@dataclass
class Rifle:
    """When and how to re-initialise ``head``; the training loop calls :meth:`after_step`."""

    head: nn.Linear
    steps: list[int]
    seed: int = 0
    init: str = "default"
    reset_momentum: bool = False
    cyclic_lr: bool = False

    def head_lr_factor(self, step: int, total_steps: int) -> float:
        """Cosine factor within the current period (1 at its start, 0 at its end)."""
        bounds = [0, *self.steps, total_steps]
        for start, stop in zip(bounds, bounds[1:]):
            if start <= step < stop:
                return 0.5 * (1 + math.cos(math.pi * (step - start) / (stop - start)))
        return 0.0

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """Re-initialise if ``step`` (steps done so far) ends a period; returns whether it did."""
        if step not in self.steps:
            return False
        event = self.steps.index(step)
        generator = torch.Generator(device=self.head.weight.device).manual_seed(
            self.seed * 1_000_003 + event + 1)
        init_head_(self.head, self.init, generator)
        if self.reset_momentum:
            for param in self.head.parameters():
                optimizer.state.pop(param, None)
        return True
