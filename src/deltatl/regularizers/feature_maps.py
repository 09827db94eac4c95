r"""DELTA's term (Li et al., ICLR 2019): the target's feature maps kept close to the frozen source's.

.. math:: \alpha\, P\, \Omega(FM^t, FM^s; w)

with :math:`\Omega` = :func:`deltatl.regularizers.delta_distance` (its docstring has the formula and
the reductions), :math:`w` the supervised channel attention (``delta``) or uniform (``delta-noatt``),
and :math:`P` the number of DDP processes for the batch-summed reductions (1 in one process).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import DeltatlError
from .base import Regularizer, Setup, StepInputs, register
from .functional import delta_distance, source_energy


@register
class FeatureMapDistance(Regularizer):
    """DELTA's feature-map distance over ``layers``, weighted per channel.

    Args:
        layers: the tapped module names (the source network's maps are read at the same names).
        channel_weights: layer -> weights summing to 1 (stored as buffers ``attention_<i>``, part of the
            checkpoint); None for uniform channels.
        reduction: ``"sum"`` (official), ``"mean"`` or ``"relative"``.
        distance_scale: multiplies the term; the world size under DDP with ``"sum"``/``"relative"``.
        energy_sum: ``"relative"`` under DDP: sums a tensor over the processes in place, so the
            denominators are the global batch's; None in one process.
    """

    key = "delta"

    def __init__(self, layers: Sequence[str], channel_weights: Mapping[str, Tensor] | None = None,
                 reduction: str = "sum", distance_scale: float = 1.0,
                 energy_sum: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        self.source_layers = tuple(layers)
        self.reduction, self.distance_scale, self.energy_sum = reduction, distance_scale, energy_sum
        self.attention = channel_weights is not None
        if channel_weights is not None:
            missing = set(self.source_layers) - set(channel_weights)
            if missing:
                raise DeltatlError(f"no channel attention for layer(s) {', '.join(sorted(missing))}")
            for i, name in enumerate(self.source_layers):
                self.register_buffer(f"attention_{i}", channel_weights[name].detach().float().clone())

    @classmethod
    def build(cls, setup: Setup) -> "FeatureMapDistance":
        options = setup.options
        if not options.get("layers"):
            raise DeltatlError(f"method {options.get('method')} needs the layers whose feature maps it regularizes")
        weights = None
        if options.get("attention"):
            weights = options.get("channel_weights")
            if weights is None:
                raise DeltatlError(f"method {options.get('method')} needs channel attention weights")
        return cls(options["layers"], weights, options.get("reduction", "sum"), options.get("distance_scale", 1.0),
                   options.get("energy_sum"))

    def channel_weights(self) -> dict[str, Tensor] | None:
        if not self.attention:
            return None
        return {name: getattr(self, f"attention_{i}") for i, name in enumerate(self.source_layers)}

    def _energies(self, source: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        """The relative term's denominators, summed over the processes under DDP (one all-reduce)."""
        if self.reduction != "relative" or self.energy_sum is None:
            return None
        names = list(source)
        total = self.energy_sum(torch.stack([source_energy(source[n]) for n in names]))
        return dict(zip(names, total.unbind()))

    def weighted_distance(self, target: Mapping[str, Tensor], source: Mapping[str, Tensor],
                          weight: float) -> Tensor:
        """``weight * distance_scale * Omega(target, source)`` over this term's layers."""
        if list(target) != list(self.source_layers):  # the objective may tap more layers for other terms
            target = {n: target[n] for n in self.source_layers}
            source = {n: source[n] for n in self.source_layers}
        distance = delta_distance(target, source, self.channel_weights(), self.reduction, self._energies(source))
        return weight * self.distance_scale * distance

    def forward(self, inputs: StepInputs, weight: float) -> Tensor:
        return self.weighted_distance(inputs.target_features, inputs.source_features, weight)
