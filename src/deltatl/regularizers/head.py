r"""L2 on the new classifier: the head has no pretrained value to stay close to, so it decays to 0."""
from __future__ import annotations

from torch import Tensor, nn

from .base import Regularizer, Setup, StepInputs, register
from .functional import l2_penalty


@register
class HeadL2(Regularizer):
    r""":math:`\beta \sum_{w \in \text{head}} \frac{1}{2}\|w\|_2^2`, the head's term in L2-SP and DELTA
    (their weight decay is 0: the backbone has its own term). Not batch-dependent: no DDP scaling."""

    key = "head"

    def __init__(self, params: tuple[nn.Parameter, ...]):
        super().__init__()
        self._params = params  # the live parameters, not registered (the model owns them)

    @classmethod
    def build(cls, setup: Setup) -> "HeadL2":
        return cls(tuple(param for _, param in setup.head))

    def forward(self, inputs: StepInputs | None = None, weight: float = 1.0) -> Tensor:
        return weight * l2_penalty(self._params)
