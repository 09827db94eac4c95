"""The training objective: ``(images, labels) -> {"loss", "logits", "ce", "reg/..."}``.

A method (:mod:`deltatl.methods`) is a list of weighted regularizer terms; the objective builds each
term from the registry (:mod:`deltatl.regularizers`), gathers once per step what they need (the frozen
source network's feature maps at the union of the layers they read) and sums cross-entropy and terms.
Every term is returned separately (already multiplied by its weight) so it can be logged.

The objective owns the target network and, when a term reads feature maps, the frozen source network:
its BatchNorm on its running statistics (official) or the batch's (``source_bn="batch"``), its forward
stopped after the last tapped layer. The training loop only calls it.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DeltatlError
from ..features import FeatureHooks
from ..methods import METHODS, Method, Term, get_method
from ..models import head_module, split_parameters
from ..regularizers import FeatureMapDistance, Regularizer, Setup, StepInputs, build_regularizer

__all__ = ["METHODS", "Method", "Objective", "SOURCE_BN_MODES", "Term", "get_method"]

SOURCE_BN_MODES = ("running", "batch")
# Checkpoints written before the terms were modules of their own kept DELTA's attention at the top.
_LEGACY_STATE_PREFIXES = {"attention_": "delta.attention_"}


class AutocastForward(nn.Module):
    """Runs ``inner`` under autocast and returns its floating-point output in float32, so that what
    is computed from it (the loss) is computed in float32 and outside autocast."""

    def __init__(self, inner: nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.inner, self.device_type, self.dtype = inner, device_type, dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            out = self.inner(*args, **kwargs)
        return out.float() if isinstance(out, Tensor) and out.is_floating_point() else out


class _SourceDone(Exception):
    """Raised by the source's last hook: nothing after the last tapped layer needs computing."""


class Objective(nn.Module):
    """The target model with the loss of one method.

    Args:
        model: the target network (pretrained backbone + new head), *before* any training: the L2-SP
            starting point and the DELTA source network are taken from it.
        method: a key of :data:`METHODS`.
        alpha: weight of the L2-SP or DELTA term.
        beta: weight of the head's L2 term (L2-SP and DELTA methods).
        layers: tapped module names (DELTA methods).
        channel_weights: layer -> attention weights summing to 1 (``delta``); constants.
        reduction: DELTA's batch reduction, ``"sum"`` (official), ``"mean"`` or ``"relative"`` (see
            :func:`deltatl.regularizers.delta_distance`).
        source_bn: how the frozen source network's BatchNorm normalises (DELTA methods).
            ``"running"`` (official): with its ImageNet running statistics, while the target (train
            mode) uses the batch's, so the term is non-zero at step 0 and part of it measures only the
            difference between the two sets of statistics (on Fashion-MNIST at 96 px, batch 32, that
            part is ~10^4 times the cross-entropy at alpha 1). ``"batch"``: with the current batch's
            statistics, as the target's, running statistics untouched; the term is then exactly 0 at
            step 0 and measures only what training changed. :meth:`statistics_gap` measures the part.
        freeze_bn: keep BatchNorm statistics of a frozen backbone fixed (default for ``l2-fe``). The
            official attention step trained its L2-FE model in train mode (statistics adapting).
        distance_scale: multiplies the DELTA term; the world size under DDP with ``reduction="sum"``
            or ``"relative"``, so that a global batch means the same on one process or many.
        energy_sum: ``"relative"`` under DDP: sums a tensor over the processes in place (the
            denominators then are those of the global batch); None in a single process.
        batch_gather: under DDP, the global batch of a per-process tensor, differentiable
            (:meth:`deltatl.distributed.DistEnv.gather_batch`), for terms of the whole batch (BSS);
            None in a single process.
        aux_weight: weight of the auxiliary classifier's cross-entropy when the model returns
            ``(logits, aux_logits)`` in training mode (Inception-V3 with its aux head kept, see
            :mod:`deltatl.models`); logged as ``aux/ce``, already weighted. 0 ignores the aux output.

    ``forward`` returns the same keys in train and eval mode: ``loss`` (what is minimised), ``logits``,
    ``ce`` (mean cross-entropy) and ``reg/<term>`` for each regularizer, each already weighted (and
    ``aux/ce`` in training mode when an auxiliary head is kept and weighted).
    """

    def __init__(self, model: nn.Module, method: str, *, alpha: float = 0.01, beta: float = 0.01,
                 layers: Sequence[str] | None = None, channel_weights: Mapping[str, Tensor] | None = None,
                 reduction: str = "sum", source_bn: str = "running", freeze_bn: bool = True,
                 distance_scale: float = 1.0, aux_weight: float = 0.0,
                 energy_sum: Callable[[Tensor], Tensor] | None = None,
                 batch_gather: Callable[[Tensor], Tensor] | None = None,
                 source_model: nn.Module | None = None,
                 gradient_mean: Callable[[Tensor], Tensor] | None = None,
                 term_options: Mapping[str, object] | None = None, l2sp_fused: bool = False):
        super().__init__()
        # How the networks run (prepare): a plain tuple, not registered modules (no state of its own)
        self._execution: tuple[nn.Module, nn.Module | None] | None = None
        if source_bn not in SOURCE_BN_MODES:
            raise DeltatlError(f"source BatchNorm mode must be one of {', '.join(SOURCE_BN_MODES)}, got {source_bn!r}")
        self.source_bn = source_bn
        self.model = model
        self.aux_weight = aux_weight
        self.method = get_method(method)
        self.alpha, self.beta, self.reduction = alpha, beta, reduction
        self.freeze_bn = freeze_bn and self.method.freeze_backbone
        self.distance_scale = distance_scale
        shared, private = split_parameters(model)
        if self.method.freeze_backbone:
            for _, param in shared:
                param.requires_grad_(False)
        options = {**self.method.options, "method": method, "layers": layers, "channel_weights": channel_weights,
                   "reduction": reduction, "distance_scale": distance_scale, "energy_sum": energy_sum,
                   "batch_gather": batch_gather, "l2sp_fused": l2sp_fused, **(term_options or {})}
        setup = Setup(model, tuple(shared), tuple(private), options,
                      None if source_model is None else head_module(source_model))
        # Each term is a submodule named by its key (its state, e.g. l2sp.anchor__*, is checkpointed).
        self._terms: tuple[tuple[Term, Regularizer], ...] = tuple(
            (term, build_regularizer(term.regularizer, setup)) for term in self.method.terms)
        for term, module in self._terms:
            self.add_module(module.key, module)
        self.layers: tuple[str, ...] = tuple(dict.fromkeys(n for _, m in self._terms for n in m.source_layers))
        self._head_input: Tensor | None = None
        self._source_logits_needed = any(m.reads_source_logits for _, m in self._terms)
        if self._source_logits_needed and source_model is None:  # a copy of the target has the new head
            raise DeltatlError(f"method {method} reads the pretrained network's own logits: give source_model")
        if gradient_mean is not None:  # DDP averages the target's gradients; the terms' own parameters here
            for _, module in self._terms:
                for param in module.parameters():
                    param.register_hook(gradient_mean)
        self.source: nn.Module | None = None
        if self.layers or self._source_logits_needed:
            # The source is a frozen copy of the pretrained network: eval mode (BatchNorm running
            # statistics), no gradients, never wrapped by DDP. Copied before the target's hooks exist,
            # which a deep copy would otherwise carry over. With its own classifier when a term reads
            # its logits (the backbone is the same).
            pretrained = model if source_model is None else source_model
            self.source = copy.deepcopy(pretrained).eval().requires_grad_(False)
            for module in self._source_batchnorms():
                # Without tracking, a BatchNorm in train mode normalises with the batch's statistics and
                # leaves its running statistics as they are; in eval mode it still uses them.
                module.track_running_stats = False
            self._set_source_statistics(self.source_bn)
            self.target_hooks = FeatureHooks(model, self.layers)
            self.source_hooks = FeatureHooks(self.source, self.layers)
            self._source_calls = 0
            if not self._source_logits_needed:  # nothing after the last tapped layer is needed
                for name in self.layers:
                    self.source.get_submodule(name).register_forward_hook(self._stop_source_early)
        if any(m.reads_head_input for _, m in self._terms):  # after the source's copy: not on the source
            head_module(model).register_forward_pre_hook(self._record_head_input)

    def prepare(self, net: nn.Module | None = None, device_type: str = "cpu",
                amp_dtype: torch.dtype | None = None) -> None:
        """Choose once how ``forward`` runs the networks: ``net`` in place of the bare target (compiled
        and/or wrapped by DDP; the hooks, L2-SP's parameters and RIFLE's head are its inner modules and
        parameters), and both networks under autocast with ``amp_dtype``. ``prepare()`` restores the
        bare networks."""
        if net is None and amp_dtype is None:
            self._execution = None
            return
        target, source = (net if net is not None else self.model), self.source
        if amp_dtype is not None:
            target = AutocastForward(target, device_type, amp_dtype)
            source = None if source is None else AutocastForward(source, device_type, amp_dtype)
        self._execution = (target, source)

    def _networks(self) -> tuple[nn.Module, nn.Module | None]:
        return self._execution or (self.model, self.source)

    def _weight(self, term: Term) -> float:
        return (self.alpha if term.weight == "alpha" else self.beta if term.weight == "beta"
                else self.method.term_weights[term.weight])  # a joined method's term: its authors' weight

    @property
    def adds_gradients(self) -> bool:
        """Whether a term adds its gradient after the backward (:meth:`add_gradients_`)."""
        return any(module.adds_gradients for _, module in self._terms)

    def add_gradients_(self, scale: float = 1.0) -> None:
        """After the backward: the gradients of the terms computed outside autograd (``--l2sp-fused``)."""
        for term, module in self._terms:
            if module.adds_gradients and self._weight(term):
                module.add_gradients_(self._weight(term), scale)

    def _record_head_input(self, _module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self._head_input = args[0]

    def _stop_source_early(self, _module: nn.Module, _args: object, _output: object) -> None:
        # Runs after the FeatureHooks hook of the same module (registered later), so the output is kept.
        self._source_calls += 1
        if self._source_calls == len(self.layers):
            raise _SourceDone

    def _source_batchnorms(self) -> list[nn.Module]:
        return [m for m in self.source.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def _set_source_statistics(self, mode: str) -> None:
        """The source stays in eval mode (no dropout, no random draws); only its BatchNorm layers
        switch to batch statistics for ``"batch"``."""
        self.source.eval()
        for module in self._source_batchnorms():
            module.train(mode == "batch")

    def _delta_term(self) -> FeatureMapDistance | None:
        return next((m for _, m in self._terms if isinstance(m, FeatureMapDistance)), None)

    def channel_weights(self) -> dict[str, Tensor] | None:
        """DELTA's channel attention (layer -> weights), None without it."""
        term = self._delta_term()
        return None if term is None else term.channel_weights()

    def train(self, mode: bool = True) -> "Objective":
        super().train(mode)
        if self.source is not None:
            self._set_source_statistics(self.source_bn)
        if mode and self.freeze_bn:
            # A frozen feature extractor keeps its BatchNorm statistics frozen as well; dropout stays on.
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def param_groups(self) -> list[dict[str, object]]:
        """Trainable parameters as optimizer groups: the backbone's (if any), the head's, and the terms'
        own (LwF's source head), each named."""
        shared, private = split_parameters(self.model)
        groups = [{"params": [p for _, p in shared if p.requires_grad], "name": "backbone"},
                  {"params": [p for _, p in private], "name": "head"},
                  {"params": [p for _, m in self._terms for p in m.parameters() if p.requires_grad],
                   "name": "regularizers"}]
        return [g for g in groups if g["params"]]

    def regularizer_state(self) -> dict[str, Tensor]:
        """State that is not the target model's and cannot be rebuilt from it (L2-SP starting point,
        attention weights); saved in checkpoints so that a resumed run is exact."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("model.", "source."))}

    def load_regularizer_state(self, state: Mapping[str, Tensor]) -> None:
        own = self.state_dict()
        state = {_renamed_legacy_key(k): v for k, v in state.items()}
        if set(state) != set(self.regularizer_state()):
            raise DeltatlError("checkpoint was written by another method (regularizer state differs)")
        self.load_state_dict({**own, **state})

    def source_features(self, images: Tensor) -> dict[str, Tensor]:
        """The frozen source network's feature maps; its forward stops after the last tapped layer
        unless a term reads its logits."""
        return self._run_source(images)[0]

    def _run_source(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        """The source's tapped feature maps and, when it runs to the end, its logits (float32)."""
        self._source_calls = 0
        logits = None
        with torch.no_grad():
            try:
                logits = self._networks()[1](images)
            except _SourceDone:
                pass
        features = self.source_hooks.pop()
        return features, (logits.float() if self._source_logits_needed else None)

    @torch.no_grad()
    def statistics_gap(self, images: Tensor) -> Tensor | None:
        """The weighted DELTA term that BatchNorm statistics alone produce on ``images``.

        The distance between the source's feature maps under the batch's statistics and under its
        running statistics, with this objective's alpha, channel weights and reduction: the value of
        the term at step 0 with ``source_bn="running"`` (0 with ``"batch"`` at step 0, where it shows
        what the official setting would add). None for methods without DELTA's term.
        """
        term = self._delta_term()
        if term is None:
            return None
        try:
            self._set_source_statistics("batch")
            batch = self.source_features(images)
            self._set_source_statistics("running")
            running = self.source_features(images)
        finally:
            self._set_source_statistics(self.source_bn)
        return term.weighted_distance(batch, running, self.alpha)

    def forward(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        # The source runs first, so its forward's temporaries are freed before the target's autograd
        # graph exists: DELTA's peak memory is then l2's plus the source's weights and tapped maps
        # (`deltatl bench --only memory`). Same numbers: the source is in eval mode and draws no random
        # numbers.
        source, source_logits = self._run_source(images) if self.source is not None else ({}, None)
        logits = self._networks()[0](images)
        aux_logits = None
        if isinstance(logits, tuple):  # (logits, aux logits): Inception-V3's kept aux head, training mode
            logits, aux_logits = logits[0].float(), logits[1].float()
        ce = F.cross_entropy(logits, labels)
        terms: dict[str, Tensor] = {}
        if aux_logits is not None and self.aux_weight:
            terms["aux/ce"] = self.aux_weight * F.cross_entropy(aux_logits, labels)
        head_input, self._head_input = self._head_input, None
        inputs = StepInputs(images, labels, logits, self.target_hooks.pop() if self.source is not None else {}, source,
                            head_input, source_logits)
        for term, module in self._terms:
            weight = self._weight(term)
            if weight or term.weight == "alpha":  # a head term at beta 0 is skipped (not logged)
                terms[f"reg/{module.key}"] = module(inputs, weight)
        loss = ce + sum(terms.values()) if terms else ce
        return {"loss": loss, "logits": logits, "ce": ce.detach(),
                **{k: v.detach() for k, v in terms.items()}}


def _renamed_legacy_key(key: str) -> str:
    for old, new in _LEGACY_STATE_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key
