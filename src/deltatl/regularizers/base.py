"""What a regularizer is, and the registry of them by name.

A regularizer is an ``nn.Module`` registered under a ``key`` (logged as ``reg/<key>``). It is built
once from a :class:`Setup` (the target network, its backbone and head parameters, the method's
options) and says what it needs each step through ``source_layers``: the layers whose feature maps,
target's and frozen source's, it reads. The objective gathers what all its terms need once per step
(one source forward, one set of hooks, the classifier's input) into :class:`StepInputs` and calls
each term with its weight.

Adding a regularizer is one file with one ``@register`` class, plus its name in a method's terms
(:mod:`deltatl.methods`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from torch import Tensor, nn

from ..errors import DeltatlError


@dataclass(frozen=True)
class Setup:
    """What a regularizer may use when it is built.

    Attributes:
        model: the target network before any training (pretrained backbone, new head).
        shared: its ``(name, parameter)`` pairs of the backbone (transferred from the source).
        head: those of the new classifier.
        options: the method's and the run's settings (``layers``, ``channel_weights``, ``reduction``,
            ``distance_scale``, ``energy_sum``, ``attention``...); a regularizer reads those it knows.
        source_head: the classifier of the pretrained network (e.g. ImageNet's 1000 classes), for the
            terms that keep answering the source task (LwF, Co-Tuning); None if the objective has none.
    """

    model: nn.Module
    shared: tuple[tuple[str, nn.Parameter], ...]
    head: tuple[tuple[str, nn.Parameter], ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    source_head: nn.Linear | None = None  # the pretrained network's own classifier (ImageNet's), if given


@dataclass(frozen=True)
class StepInputs:
    """What the objective gathered for this step.

    Attributes:
        images, labels: the batch.
        logits: the target network's output (float32).
        target_features / source_features: layer -> feature map of the target (with gradient) and of
            the frozen source (constant), for the union of the terms' ``source_layers``; empty when
            no term needs them.
        head_features: what entered the target's classifier (with gradient), when a term sets
            ``reads_head_input``; else None.
        source_logits: the frozen pretrained network's logits on its own classes (a constant), when a
            term sets ``reads_source_logits``; else None.
    """

    images: Tensor
    labels: Tensor
    logits: Tensor
    target_features: Mapping[str, Tensor] = field(default_factory=dict)
    source_features: Mapping[str, Tensor] = field(default_factory=dict)
    head_features: Tensor | None = None  # the classifier's input (b x d), when a term reads it
    source_logits: Tensor | None = None  # the frozen pretrained network's own output, when a term reads it


class Regularizer(nn.Module):
    """A term of the training loss; subclasses set ``key`` and implement ``build`` and ``forward``."""

    key: ClassVar[str]
    #: layers whose target and source feature maps the term reads each step (none: no source network)
    source_layers: tuple[str, ...] = ()
    #: whether the term reads the classifier's input features (``StepInputs.head_features``)
    reads_head_input: bool = False
    #: whether the term reads the pretrained network's own logits (``StepInputs.source_logits``)
    reads_source_logits: bool = False
    #: whether the term is built from the pretrained network's own classifier (``Setup.source_head``)
    uses_source_head: bool = False

    @classmethod
    def build(cls, setup: Setup) -> "Regularizer":
        raise NotImplementedError

    def forward(self, inputs: StepInputs, weight: float) -> Tensor:
        """The weighted term, a float32 scalar (the term applies its weight itself so that it can fold
        in scales of its own in the order that fixes its floating-point result)."""
        raise NotImplementedError

    #: whether the term's gradient is added by :meth:`add_gradients_` after the backward instead of
    #: through autograd (its ``forward`` then returns the value only, for the logs)
    adds_gradients: bool = False

    def add_gradients_(self, weight: float, scale: float) -> None:
        """Add ``scale * weight * d(term)/d(parameters)`` to the parameters' ``.grad`` (``scale``: the
        fp16 gradient scaler's factor, 1 otherwise). Only for terms with ``adds_gradients``."""


REGULARIZERS: dict[str, type[Regularizer]] = {}
R = TypeVar("R", bound=type[Regularizer])


def register(cls: R) -> R:
    """Class decorator: make ``cls`` available to methods under ``cls.key``."""
    if cls.key in REGULARIZERS and REGULARIZERS[cls.key] is not cls:
        raise ValueError(f"a regularizer named {cls.key!r} is already registered")
    REGULARIZERS[cls.key] = cls
    return cls


def build_regularizer(key: str, setup: Setup) -> Regularizer:
    if key not in REGULARIZERS:
        raise DeltatlError(f"unknown regularizer '{key}' (registered: {', '.join(sorted(REGULARIZERS))})")
    return REGULARIZERS[key].build(setup)

