"""RIFLE (ICML 2020): re-initialise the final linear layer periodically during fine-tuning.

Training is cut into ``K + 1`` periods of ``floor(E / (K + 1))`` epochs (the remainder goes to the last
period) and the head is re-initialised at the end of every period but the last (the official code also
re-initialised after the last epoch, returning a random head: a bug that is not reproduced).
Re-initialisation is the head's default initialisation, in place, so the optimizer and DDP keep
referring to the same Parameter objects, and it draws from a generator seeded by ``(seed, event)``, so
every process of a distributed run draws the same head.

Faithful default: the head's momentum buffers and learning rate are left as they are (as in the
official code). Switches: ``reset_momentum`` clears the head's optimizer state at each re-init;
``cyclic_lr`` gives the head a cosine learning rate that restarts at every re-init.

The authors ran RIFLE for 40 epochs with a per-epoch cosine learning rate: every head then trains
while the rate is still high. After a step decay, a new head trains at the low rate only
(:func:`rifle_warnings` says so). The head's L2 weight beta: the RIFLE code used 1e-4 with L2-SP (its
weight decay), the DELTA code 0.01 (deltatl's default); pass ``--beta 1e-4`` to reproduce RIFLE's
L2-SP rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DeltatlError
from ..models import init_head_
from ..seeds import derived_seed
from .hooks import StepContext, StepHook, param_group


class RifleWarning(UserWarning):
    """A RIFLE setting that leaves the final head under-trained."""


def rifle_steps(total_steps: int, times: int, steps_per_epoch: int | None = None) -> list[int]:
    """The steps after which the head is re-initialised, as the authors' ``train.py`` spaces them.

    Training is cut into periods of ``floor(units / (times + 1))`` units and the head is re-initialised
    at the end of each of the first ``times`` periods; the remainder of the units goes to the last
    head, so nothing is cut and no re-initialisation falls in the final period. With
    ``steps_per_epoch`` (and a whole number of epochs) the units are epochs, as the official code
    counts them; otherwise iterations. 40 epochs, 3 re-inits: after epochs 10, 20 and 30; 10 epochs,
    3 re-inits: after epochs 2, 4 and 6 (the last head trains 4 epochs).

    Raises:
        DeltatlError: ``times`` is negative, or leaves a period shorter than one unit.
    """
    if times < 0:
        raise DeltatlError("`rifle` must be >= 0")
    if times == 0:
        return []
    unit = steps_per_epoch if steps_per_epoch and total_steps % steps_per_epoch == 0 else 1
    units = total_steps // unit
    period = units // (times + 1)
    if period < 1:
        raise DeltatlError(f"`rifle` {times} needs more than {times} {'epochs' if unit > 1 else 'steps'}")
    return [unit * period * i for i in range(1, times + 1)]


def rifle_warnings(steps: list[int], total_steps: int, decay_step: int | None) -> list[str]:
    """Why a RIFLE run may end with an under-trained head (the caller shows these to the user).

    Args:
        steps: the re-initialisation steps (:func:`rifle_steps`).
        decay_step: the step after which a step schedule divides the learning rate, or None.
    """
    if not steps:
        return []
    last, notes = steps[-1], []
    if decay_step is not None and last >= decay_step:
        notes.append(f"RIFLE re-initialises the head at step {last}, after the learning rate was divided "
                     f"(step {decay_step}): the last head trains at the low rate only; RIFLE's authors used "
                     f"a cosine schedule (`schedule` cosine) and 40 epochs")
    if total_steps - last < 0.1 * total_steps:
        notes.append(f"RIFLE's last head trains {total_steps - last} of {total_steps} steps (under 10 %): "
                     f"lower `rifle` or train longer")
    return notes


@dataclass
class Rifle(StepHook):
    """When and how to re-initialise ``head``: a step hook of the training loop."""

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

    def before_step(self, context: StepContext) -> None:
        """With ``cyclic_lr``: the head's learning rate, its base rate times :meth:`head_lr_factor`."""
        if self.cyclic_lr:
            head = param_group(context.optimizer, "head")
            head["lr"] = head["initial_lr"] * self.head_lr_factor(context.step, context.total_steps)

    def after_step(self, context: StepContext) -> str | None:
        """Re-initialise if ``context.step`` (steps done so far) ends a period; the event logged if so."""
        return "rifle" if self.reinitialise(context.step, context.optimizer) else None

    def reinitialise(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """Re-initialise if ``step`` (steps done so far) ends a period; returns whether it did."""
        if step not in self.steps:
            return False
        event = self.steps.index(step)
        generator = torch.Generator(device=self.head.weight.device).manual_seed(derived_seed(self.seed, event + 1))
        init_head_(self.head, self.init, generator)
        if self.reset_momentum:
            for param in self.head.parameters():
                optimizer.state.pop(param, None)
        return True
