r"""WiSE-FT (Wortsman et al., CVPR 2022): a weight-space ensemble of the start and the end of fine-tuning.

.. math:: \theta(a) = (1 - a)\,\theta_0 + a\,\theta_{ft}

for every parameter and floating-point buffer (BatchNorm's running statistics interpolated too), with
:math:`\theta_0` the linear-probe model (pretrained backbone, probed head: LP-FT's start) and
:math:`\theta_{ft}` the model fine-tuned from it. The mixing coefficient :math:`a` is chosen on the
validation split, never on the test split.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

#: the coefficients tried (the paper's 0, 0.1, ..., 1)
MIXING_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def interpolate(start: Mapping[str, Tensor], end: Mapping[str, Tensor], mixing: float) -> dict[str, Tensor]:
    """``(1 - mixing) * start + mixing * end`` for every floating-point tensor; other tensors (BatchNorm's
    step counts) are ``end``'s. ``mixing`` 0 gives ``start`` and 1 gives ``end``, exactly."""
    if list(start) != list(end):
        raise ValueError("the two state dicts hold different tensors")
    mixed = {}
    for key, last in end.items():
        first = start[key]
        if not last.is_floating_point() or mixing == 1:
            mixed[key] = last.clone()
        elif mixing == 0:
            mixed[key] = first.clone()
        else:
            mixed[key] = torch.lerp(first.to(last.dtype), last, mixing)
    return mixed


def choose_mixing(model: nn.Module, start: Mapping[str, Tensor], end: Mapping[str, Tensor],
                  validate: Callable[[nn.Module], float], grid: Sequence[float] = MIXING_GRID
                  ) -> tuple[float, dict[float, float]]:
    """The coefficient of ``grid`` whose interpolation ``validate`` scores highest (ties: the earlier
    one), and every score; ``model`` is left holding that interpolation."""
    scores = {}
    for mixing in grid:
        model.load_state_dict(interpolate(start, end, mixing))
        scores[mixing] = validate(model)
    best = max(grid, key=lambda a: scores[a])
    model.load_state_dict(interpolate(start, end, best))
    return best, scores
