r"""L2-SP (Li et al., ICML 2018): decay of the transferred weights towards their pretrained values."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .base import Regularizer, Setup, StepInputs, register
from .functional import l2sp_penalty


@register
class L2SP(Regularizer):
    r"""L2-SP penalty with the starting point stored in the module.

    .. math:: \Omega = \sum_{i \in \text{shared}} \frac{1}{2} \|w_i - w_i^*\|_2^2

    Built from the shared (backbone) parameters right after the pretrained weights are loaded: the new
    head has no starting point and belongs in :func:`l2_penalty`. The module keeps the live
    ``Parameter`` objects (as an optimizer does, so not registered as its own parameters) and a copy of
    each as a buffer named after the parameter (``.`` replaced by ``__``, e.g.
    ``anchor__layer1__0__conv1__weight``).

    The buffers are persistent, i.e. part of ``state_dict()``: a resumed run restores the exact
    starting point from its checkpoint instead of rebuilding it from pretrained weights that might
    have changed (another download, another file, or a model rebuilt without them). This costs one
    extra copy of the backbone per checkpoint. Move the module with the model (``.to(device)``).

    The penalty does not depend on the batch, so it needs no scaling under DDP (every process
    computes the same value and DDP averages identical gradients).

    Args:
        named_parameters: ``(name, parameter)`` pairs of the shared parameters, e.g. the backbone part
            of ``model.named_parameters()``. BatchNorm weight and bias included (running statistics
            are buffers, not parameters).

    Raises:
        ValueError: no parameters, or repeated names.
    """

    key = "l2sp"

    def __init__(self, named_parameters: Iterable[tuple[str, nn.Parameter]]) -> None:
        super().__init__()
        pairs = list(named_parameters)
        if not pairs:
            raise ValueError("L2SP needs at least one parameter")
        self.names: tuple[str, ...] = tuple(name for name, _ in pairs)
        self._params: tuple[nn.Parameter, ...] = tuple(param for _, param in pairs)
        self._buffer_names: tuple[str, ...] = tuple("anchor__" + name.replace(".", "__") for name in self.names)
        if len(set(self._buffer_names)) != len(pairs):
            raise ValueError("repeated (or, after replacing '.' by '__', colliding) parameter names")
        for buffer_name, param in zip(self._buffer_names, self._params):
            self.register_buffer(buffer_name, param.detach().clone(), persistent=True)

    def anchors(self) -> tuple[Tensor, ...]:
        """The starting points, in the order of :attr:`names`."""
        return tuple(getattr(self, name) for name in self._buffer_names)

    @classmethod
    def build(cls, setup: Setup) -> "L2SP":
        term = cls(setup.shared)
        term.adds_gradients = bool(setup.options.get("l2sp_fused", False))
        return term

    def penalty(self) -> Tensor:
        """The unweighted penalty (a float32 scalar)."""
        return l2sp_penalty(self._params, self.anchors())

    def forward(self, inputs: StepInputs | None = None, weight: float = 1.0) -> Tensor:
        """``weight * penalty()``; the penalty does not depend on the batch (``inputs`` unused). With
        ``adds_gradients`` (``--l2sp-fused``) the value only: no autograd graph over every parameter,
        the gradient comes from :meth:`add_gradients_`."""
        if self.adds_gradients:
            with torch.no_grad():
                return weight * self.penalty()
        return weight * self.penalty()

    @torch.no_grad()
    def add_gradients_(self, weight: float, scale: float) -> None:
        r""":math:`g_i \mathrel{+}= s\,\alpha\,(w_i - w_i^*)`, the exact gradient of the weighted penalty,
        fused over the parameters (``torch._foreach_*``)."""
        pairs = [(p, a) for p, a in zip(self._params, self.anchors()) if p.requires_grad]
        for param, _ in pairs:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        grads = [p.grad for p, _ in pairs]
        # two in-place passes, no temporary copy of the parameters: g + s*alpha*w - s*alpha*w*
        torch._foreach_add_(grads, [p.detach() for p, _ in pairs], alpha=weight * scale)
        torch._foreach_add_(grads, [a for _, a in pairs], alpha=-weight * scale)
