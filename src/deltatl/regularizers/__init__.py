"""Regularizers of fine-tuning: the pure functions, and one registered module per term.

- :mod:`.functional`: the terms as functions of tensors (``delta_distance``, ``l2sp_penalty``,
  ``l2_penalty``, ``source_energy``), with their math.
- :mod:`.base`: what a registered term is (:class:`Regularizer`, :class:`Setup`, :class:`StepInputs`)
  and the registry :data:`REGULARIZERS`.
- one file per term: :mod:`.starting_point` (``l2sp``), :mod:`.feature_maps` (``delta``),
  :mod:`.head` (``head``), :mod:`.spectral` (``bss``), :mod:`.distillation` (``lwf``), :mod:`.co_tuning` (``co-tuning``).
"""
from .base import REGULARIZERS, Regularizer, Setup, StepInputs, build_regularizer, register
from .co_tuning import CoTuning, soft_cross_entropy, source_relationship
from .distillation import LearningWithoutForgetting, knowledge_distillation
from .feature_maps import FeatureMapDistance
from .functional import DELTA_REDUCTIONS, delta_distance, l2_penalty, l2sp_penalty, source_energy
from .head import HeadL2
from .spectral import BatchSpectralShrinkage, batch_spectral_shrinkage
from .starting_point import L2SP

__all__ = ["DELTA_REDUCTIONS", "L2SP", "REGULARIZERS", "BatchSpectralShrinkage", "CoTuning", "FeatureMapDistance",
           "HeadL2", "soft_cross_entropy", "source_relationship",
           "LearningWithoutForgetting", "Regularizer", "knowledge_distillation", "Setup", "StepInputs", "batch_spectral_shrinkage", "build_regularizer", "delta_distance",
           "l2_penalty", "l2sp_penalty", "register", "source_energy"]
