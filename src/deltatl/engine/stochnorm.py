r"""StochNorm, Stochastic Normalization (Kou et al., NeurIPS 2020): BatchNorm with two branches.

In training, each channel of each layer normalises with the mini-batch's statistics or, with
probability :math:`p`, with the moving (running) statistics, drawn anew every forward:

.. math:: z = (1 - s) \odot \mathrm{BN}_{batch}(x) + s \odot \mathrm{BN}_{moving}(x),
          \qquad s_c \sim \mathrm{Bernoulli}(p)

(the moving branch uses the statistics from before this batch's update); the running statistics
update as BatchNorm's do. In evaluation it is BatchNorm with the running statistics. Defaults: the
authors' :math:`p = 0.5`. The draws come from PyTorch's global generator, which
:func:`deltatl.engine.fit.fit` seeds per process and checkpoints, so a resumed run is exact; on CPU and
GPU alike (the authors' reference code moved its mask to CUDA unconditionally).

The layers are not replaced: two hooks give each BatchNorm layer (timm's ``BatchNormAct2d`` too,
whose activation follows the normalisation inside the layer) the stochastic branch, so the network,
its state dict and its checkpoints are those of the plain model. Because the activation is applied
per element, choosing per channel between the two activated outputs is choosing between the two
normalisations. Both branches are computed, as in the authors' code: a single pass with per-channel
statistics chosen before the normalisation is equal, but measured slower on the CPU (BENCHMARKS.md).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DeltatlError


class StochasticStatistics:
    """The hooks of one BatchNorm layer: the moving branch before its forward, the choice after."""

    def __init__(self, p: float) -> None:
        if not 0 <= p <= 1:
            raise DeltatlError(f"StochNorm's probability must be in [0, 1], got {p}")
        self.p = p
        self.moving: Tensor | None = None

    def before(self, module: nn.modules.batchnorm._BatchNorm, args: tuple[Any, ...]) -> None:
        if not (module.training and module.track_running_stats and self.p > 0):
            return
        # The moving branch normalises with the running statistics from before this batch's update, through
        # copies: its backward reads the statistics it was computed with, and the batch branch then updates
        # the layer's own in place (without the copies the backward silently saw the updated ones).
        running = module.running_mean, module.running_var
        module.train(False)
        module.running_mean, module.running_var = running[0].clone(), running[1].clone()
        try:
            self.moving = type(module).forward(module, *args)  # the class's forward: no hooks again
        finally:
            module.running_mean, module.running_var = running
            module.train(True)

    def after(self, module: nn.modules.batchnorm._BatchNorm, _args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        if self.moving is None:
            return None
        moving, self.moving = self.moving, None
        shape = [1, module.num_features] + [1] * (output.dim() - 2)
        pick_moving = torch.rand(shape, device=output.device) < self.p  # one draw per channel
        return torch.where(pick_moving, moving, output)


def convert_stochnorm(model: nn.Module, p: float = 0.5) -> int:
    """Give every BatchNorm layer of ``model`` StochNorm's training behaviour, in place; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            hooks = StochasticStatistics(p)
            module.register_forward_pre_hook(hooks.before)
            module.register_forward_hook(hooks.after)
            count += 1
    return count
