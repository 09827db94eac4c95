"""The regularization tricks RIFLE (ICML 2020) was compared with, as switches for any method.

RIFLE's claim is 0.5-2 points of top-1 over tricks "for the similar purpose, under the same settings":
Dropout and DropConnect on the fully-connected head, Stochastic Depth, DisturbLabel and a cyclic
learning rate. Each is available here (the cyclic rates are schedules, see
:mod:`deltatl.engine.schedule`), off by default, and each changes only what it names:

- :class:`StochasticLinear` (``--head-dropout``, ``--head-dropconnect``): the head ``nn.Linear`` with
  Dropout on its input (Srivastava et al.) and/or DropConnect on its weight matrix (Wan et al. 2013),
  in training mode only. It keeps the head's Parameter objects and state-dict keys, so the optimizer
  groups, L2-SP, RIFLE's in-place re-initialisation and checkpoints are unchanged.
- Stochastic Depth (``--drop-path-rate``, Huang et al. 2016): timm's ``drop_path_rate`` at model
  creation (residual branches dropped per sample, rate rising linearly with depth);
  :func:`check_stochastic_depth` refuses models that have no such branches.
- :class:`DisturbLabel` (``--disturb-label``, Xie et al. 2016): each training label is replaced, with
  probability p, by a class drawn uniformly (possibly the same one). The draws come from a generator
  seeded by ``(seed, step)``, never from the global RNG: a resumed run draws exactly what the
  uninterrupted one drew, and under DDP each process takes its slice of the draws of the global batch,
  so N processes disturb exactly the labels one process with the global batch would.

The randomness of Dropout, DropConnect and Stochastic Depth comes from the global torch RNG, which
``fit`` seeds and checkpoints (resuming is exact, as for the networks' own dropout). The tricks are
regularizers of fine-tuning only: :func:`suspended` switches them off while DELTA's channel attention
is estimated, so the attention (and its cache) is the same with or without them.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DeltatlError
from .hooks import StepContext, StepHook

# Mixed into DisturbLabel's per-step seeds so they never coincide with another generator's.
_DISTURB_SALT = 0x5EED_D15B


class StochasticLinear(nn.Linear):
    """``nn.Linear`` with Dropout on the input and DropConnect on the weight, in training mode.

    DropConnect draws one Bernoulli(1 - p) mask of the weight matrix per forward (per batch, not per
    sample as in the paper's formulation, which would cost a weight matrix per image) and scales the
    kept weights by 1 / (1 - p), so that the expected pre-activation is that of the plain layer and
    evaluation uses the plain weights (the inverted form of the paper's Gaussian inference rule). The
    bias is not masked. In evaluation mode the layer is exactly ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dropout: float = 0.0,
                 dropconnect: float = 0.0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.dropout, self.dropconnect = dropout, dropconnect

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if self.training and self.dropout:
            x = F.dropout(x, self.dropout, training=True)
        if self.training and self.dropconnect:
            keep = torch.empty_like(weight).bernoulli_(1 - self.dropconnect)
            weight = weight * keep / (1 - self.dropconnect)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.dropout}, dropconnect={self.dropconnect}"


def install_head_regularization(model: nn.Module, head_name: str, *, dropout: float = 0.0,
                                dropconnect: float = 0.0) -> nn.Linear:
    """Replace ``model``'s head (the ``nn.Linear`` named ``head_name``) by a :class:`StochasticLinear`.

    The new module takes over the head's own Parameter objects and draws nothing from the global RNG
    (it is built on the meta device), so the run is otherwise identical. With both rates 0 the model is
    left untouched. Returns the head now in place.
    """
    old = model.get_submodule(head_name)
    if not isinstance(old, nn.Linear):
        raise DeltatlError(f"{head_name} is not a linear layer, cannot add Dropout / DropConnect to it")
    for name, p in (("head_dropout", dropout), ("head_dropconnect", dropconnect)):
        if not 0 <= p < 1:
            raise DeltatlError(f"`{name}` must be in [0, 1)")
    if not dropout and not dropconnect:
        return old
    new = StochasticLinear(old.in_features, old.out_features, old.bias is not None, dropout=dropout,
                           dropconnect=dropconnect, device="meta")
    new.weight = old.weight
    new.bias = old.bias
    new.train(old.training)
    parent, _, attr = head_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return new


def _drop_path_modules(model: nn.Module) -> list[nn.Module]:
    from timm.layers import DropPath

    return [m for m in model.modules() if isinstance(m, DropPath)]


def check_stochastic_depth(model: nn.Module, model_name: str, rate: float) -> None:
    """Fail if ``--drop-path-rate rate`` left ``model`` without any stochastic residual branch."""
    if rate and not any(m.drop_prob > 0 for m in _drop_path_modules(model)):
        raise DeltatlError(f"`drop_path_rate`: model '{model_name}' has no residual branches to drop "
                           f"(timm's drop_path_rate is ignored by this architecture)")


@contextmanager
def suspended(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model``'s Stochastic Depth, head Dropout and DropConnect rates are 0.

    Deep copies made inside the block (the L2-FE fit of DELTA's attention) keep the zero rates; the
    model's own rates are restored on exit.
    """
    from timm.layers import DropPath

    saved: list[tuple[nn.Module, str, float]] = []
    for module in model.modules():
        names: tuple[str, ...] = ("drop_prob",) if isinstance(module, DropPath) else ()
        if isinstance(module, StochasticLinear):
            names = ("dropout", "dropconnect")
        for name in names:
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, 0.0)
    try:
        yield model
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step, _DISTURB_SALT]).generate_state(1, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class DisturbLabel(StepHook):
    """Replace each training label, with probability ``p``, by a uniformly drawn class.

    Called once per training step with the step index (0-based, the same on every process).
    """

    p: float
    num_classes: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.p <= 1:
            raise DeltatlError("`disturb_label` must be in [0, 1]")
        if self.num_classes < 1:
            raise DeltatlError("DisturbLabel needs at least one class")

    def labels(self, context: StepContext, labels: Tensor) -> Tensor:
        return self(labels, context.step, context.rank, context.world_size)

    def __call__(self, labels: Tensor, step: int, rank: int = 0, world_size: int = 1) -> Tensor:
        """The labels of process ``rank``'s slice (``labels``) of the global batch of ``step``."""
        if not self.p:
            return labels
        n = labels.numel()
        generator = torch.Generator().manual_seed(_step_seed(self.seed, step))
        # Draws for the whole global batch, so the slice does not depend on the number of processes.
        coins = torch.rand(n * world_size, generator=generator)[rank * n:(rank + 1) * n]
        classes = torch.randint(self.num_classes, (n * world_size,), generator=generator)[rank * n:(rank + 1) * n]
        disturbed = coins < self.p
        return torch.where(disturbed.to(labels.device), classes.to(labels.device, labels.dtype), labels)
