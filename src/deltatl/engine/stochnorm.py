r"""StochNorm, Stochastic Normalization (Kou et al., NeurIPS 2020): BatchNorm with two branches.

In training, each channel of each layer normalises with the mini-batch's statistics or, with
probability :math:`p`, with the moving (running) statistics, drawn anew every forward:

.. math:: z = (1 - s) \odot \mathrm{BN}_{batch}(x) + s \odot \mathrm{BN}_{moving}(x),
          \qquad s_c \sim \mathrm{Bernoulli}(p)

(the moving branch uses the statistics from before this batch's update); the running statistics
update as BatchNorm's do. In evaluation it is BatchNorm with the running statistics. Defaults: the
authors' :math:`p = 0.5`. The draws come from PyTorch's global generator, which
:func:`deltatl.engine.fit.fit` seeds per process and checkpoints, so a resumed run is exact; on CPU and GPU alike (the authors'
reference code moved its mask to CUDA unconditionally).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DeltatlError


class StochNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm layer (any dimension) with StochNorm's training behaviour; same parameters and
    buffers as the layer it replaces, so checkpoints load into plain BatchNorm and back."""

    def __init__(self, num_features: int, p: float = 0.5, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        if not 0 <= p <= 1:
            raise DeltatlError(f"StochNorm's probability must be in [0, 1], got {p}")
        self.p = p

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D)")

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or not self.track_running_stats:
            return super().forward(input)
        moving = F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                              self.eps)
        batch = super().forward(input)  # updates the running statistics, as BatchNorm does
        shape = [1, self.num_features] + [1] * (input.dim() - 2)
        pick_moving = torch.rand(shape, device=input.device) < self.p  # one draw per channel
        return torch.where(pick_moving, moving, batch)


def convert_stochnorm(model: nn.Module, p: float = 0.5) -> int:
    """Replace every BatchNorm layer of ``model`` by a :class:`StochNorm` with the same weights and
    statistics, in place; returns how many were replaced."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, StochNorm):
            replacement = StochNorm(module.num_features, p, eps=module.eps, momentum=module.momentum,
                                    affine=module.affine, track_running_stats=module.track_running_stats)
            replacement.load_state_dict(module.state_dict())
            replacement.train(module.training)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr,
                    replacement.to(next(module.buffers(), torch.empty(0)).device))
            count += 1
    return count
