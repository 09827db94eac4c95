"""The methods: a name, a weight-decay rule and a list of weighted regularizer terms.

==============  ===============================================================  ============
method          loss                                                             weight decay
==============  ===============================================================  ============
``l2``          CE                                                               1e-4
``l2-fe``       CE; backbone (and its BatchNorm statistics) frozen                1e-4
``l2-sp``       CE + alpha * sum_shared 0.5||w - w*||^2 + beta * 0.5||head||^2   0
``delta-noatt`` CE + alpha * Omega_fm (uniform channels) + beta * 0.5||head||^2  0
``delta``       CE + alpha * Omega_att (channel attention) + beta * 0.5||head||^2  0
``lp-ft``       CE, starting from a linearly probed head                         1e-4
``wise-ft``     LP-FT, then (1 - a) theta_probe + a theta_ft, a on validation       1e-4
``bss``         CE + alpha * sum of the k smallest sigma^2 of the batch features  1e-4
``lwf``         CE + alpha * T^2 KL(softmax(y_src / T) || softmax(h_src(f) / T))     1e-4
``co-tuning``   CE + alpha * CE_soft(h_src(f), p(y_src | y))                       1e-4
``stochnorm``   CE; BatchNorm with batch or (p = 0.5, per channel) moving statistics  1e-4
==============  ===============================================================  ============

Beyond the papers: ``lp-ft`` (Kumar et al., ICLR 2022) first trains the new head on the frozen backbone
(the same L2-FE fit as DELTA's attention, :func:`deltatl.attention.fit_linear_probe`), then fine-tunes
everything from it; ``wise-ft`` (Wortsman et al., CVPR 2022) then interpolates the weights between
that start and the fine-tuned end (:mod:`deltatl.engine.weight_ensemble`); ``bss`` is Batch Spectral Shrinkage (Chen et al., NeurIPS 2019): alpha is its eta,
0.001 by default as its authors', k = 1; ``lwf`` is Learning without Forgetting (Li & Hoiem, ECCV
2016), the source classifier kept and distilled from the frozen pretrained network (alpha its
lambda_o, 1 by default as its authors', T = 2); ``co-tuning`` (You et al., NeurIPS 2020) trains the
source classifier on soft source labels p(y_src | y), the pretrained network's mean softmax over each
target class's training images (the paper's direct estimate; alpha its lambda, 2.3 by default as tllib's); ``stochnorm`` is Stochastic
Normalization (Kou et al., NeurIPS 2020), :mod:`deltatl.engine.stochnorm`.

Each term names a registered regularizer (:data:`deltatl.regularizers.REGULARIZERS`) and which of the
run's weights multiplies it (``alpha``, ``beta``); a method's options reach the regularizers it uses
(``attention``). Whether a method uses alpha, beta, the source network or channel attention is read
from its terms, in one place.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .errors import DeltatlError


@dataclass(frozen=True)
class Term:
    """``weight * regularizer`` in a method's loss."""

    regularizer: str  # a key of deltatl.regularizers.REGULARIZERS
    weight: str  # "alpha" or "beta"
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Method:
    """How a method trains."""

    name: str
    weight_decay: float
    terms: tuple[Term, ...] = ()
    freeze_backbone: bool = False
    # LP-FT: the head starts from a linear probe (the L2-FE fit channel attention also trains)
    linear_probe: bool = False
    # WiSE-FT: the final model interpolates the probe's start and the fine-tuned end (mixing on validation)
    weight_ensemble: bool = False
    # StochNorm: every BatchNorm of the target picks the moving statistics with this probability per channel
    stochnorm: float | None = None
    description: str = ""
    # alpha when --alpha is not given, if the method's authors chose one (else deltatl.config.default_alpha's)
    default_alpha: float | None = None
    # the weights of terms joined from other methods (a composition: delta+bss), by the term's weight name
    term_weights: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    def uses(self, weight: str) -> bool:
        """Whether ``weight`` (``"alpha"``, ``"beta"``) multiplies one of the method's terms."""
        return any(term.weight == weight for term in self.terms)

    def has(self, regularizer: str) -> bool:
        return any(term.regularizer == regularizer for term in self.terms)

    @property
    def options(self) -> dict[str, Any]:
        """The options of all its terms (given to every regularizer it builds)."""
        return {k: v for term in self.terms for k, v in term.options.items()}

    # The questions the rest of deltatl asks of a method.
    @property
    def starting_point(self) -> bool:  # L2-SP's anchor
        return self.has("l2sp")

    @property
    def feature_maps(self) -> bool:  # DELTA: the source network's feature maps
        return self.has("delta")

    @property
    def attention(self) -> bool:  # DELTA: supervised channel attention
        return bool(self.options.get("attention"))

    @property
    def head_penalty(self) -> bool:
        return self.has("head")


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("l2", 1e-4, description="cross-entropy, weight decay 1e-4 on every parameter"),
    Method("l2-fe", 1e-4, freeze_backbone=True,
           description="frozen feature extractor (BatchNorm statistics too), only the new head trains"),
    Method("l2-sp", 0.0, (Term("l2sp", "alpha"), Term("head", "beta")),
           description="decay of the backbone towards its pretrained weights, L2 on the head"),
    Method("delta-noatt", 0.0, (Term("delta", "alpha"), Term("head", "beta")),
           description="feature maps kept close to the source's, all channels alike, L2 on the head"),
    Method("delta", 0.0, (Term("delta", "alpha", MappingProxyType({"attention": True})), Term("head", "beta")),
           description="feature maps kept close to the source's, weighted by supervised channel attention"),
    Method("lp-ft", 1e-4, linear_probe=True,
           description="linear probe (the L2-FE fit), then every layer fine-tuned from the probed head"),
    Method("wise-ft", 1e-4, linear_probe=True, weight_ensemble=True,
           description="LP-FT, then the weights interpolated between its start and end, mixing chosen on validation"),
    Method("lwf", 1e-4, (Term("lwf", "alpha", MappingProxyType({"lwf_temperature": 2.0})),), default_alpha=1.0,
           description="the source classifier kept and trained to answer as the pretrained network (LwF)"),
    Method("co-tuning", 1e-4, (Term("co-tuning", "alpha"),), default_alpha=2.3,
           description="the source classifier trained too, on source labels translated from the target's (Co-Tuning)"),
    Method("stochnorm", 1e-4, stochnorm=0.5,
           description="BatchNorm normalising each channel with the batch's or, at random, the moving statistics"),
    Method("bss", 1e-4, (Term("bss", "alpha", MappingProxyType({"bss_k": 1})),), default_alpha=0.001,
           description="weight decay, and the smallest singular value of the batch's features shrunk (BSS)"),
)}


# Methods whose terms can join another method's, each with its authors' weight (alpha stays the first's).
ADD_ONS = ("bss", "lwf", "co-tuning")


def get_method(name: str) -> Method:
    """A method by name, or a composition ``a+b[+c]`` (see :func:`compose`)."""
    if "+" in name:
        return compose(name.split("+"))
    if name not in METHODS:
        raise DeltatlError(f"unknown method '{name}' (choose from {', '.join(METHODS)}, or a composition such "
                           f"as delta+bss)")
    return METHODS[name]


def fine_tuning_of(name: str) -> str:
    """The LP-FT method a WiSE-FT method interpolates: ``wise-ft`` -> ``lp-ft``, ``wise-ft+bss`` -> ``lp-ft+bss``."""
    return "+".join("lp-ft" if part == "wise-ft" else part for part in name.split("+"))


def compose(parts: list[str]) -> Method:
    """``delta+bss``, ``l2-sp+lwf``, ``lp-ft+delta``, ``stochnorm+co-tuning``...: one method.

    The first part with terms keeps them as they are (weighted by alpha and beta, its weight decay);
    each later part must be one of :data:`ADD_ONS`, whose term joins with its authors' weight (its
    ``default_alpha``, recorded in ``term_weights``). The recipes ``lp-ft``, ``wise-ft`` and
    ``stochnorm`` apply to whatever they are joined with. Refused with one line: ``l2`` or ``l2-fe`` in a
    composition, a part given twice, two recipes that exclude each other, a second part with terms that
    is not an add-on.
    """
    for part in parts:
        if part not in METHODS:
            raise DeltatlError(f"unknown method '{part}' in '{'+'.join(parts)}' (choose from {', '.join(METHODS)})")
    name = "+".join(parts)
    if len(set(parts)) != len(parts):
        raise DeltatlError(f"'{name}' names a method twice")
    if "l2-fe" in parts or "l2" in parts:
        raise DeltatlError(f"'{name}': l2 and l2-fe do not compose (l2+X is X; l2-fe trains only the head)")
    methods = [METHODS[p] for p in parts]
    if "lp-ft" in parts and "wise-ft" in parts:
        raise DeltatlError(f"'{name}': wise-ft already starts with lp-ft; give wise-ft alone")
    with_terms = [m for m in methods if m.terms]
    base, joined = (with_terms[0], with_terms[1:]) if with_terms else (None, [])
    not_add_ons = [m.name for m in joined if m.name not in ADD_ONS]
    if not_add_ons:
        raise DeltatlError(f"'{name}': {', '.join(not_add_ons)} cannot join another method's terms (only "
                           f"{', '.join(ADD_ONS)} can; put the method with alpha first)")
    terms = list(base.terms) if base else []
    weights = {}
    for add_on in joined:
        for term in add_on.terms:
            terms.append(Term(term.regularizer, add_on.name, term.options))
        weights[add_on.name] = add_on.default_alpha
    stochnorm = next((m.stochnorm for m in methods if m.stochnorm is not None), None)
    return Method(name, base.weight_decay if base else 1e-4, tuple(terms),
                  linear_probe=any(m.linear_probe for m in methods),
                  weight_ensemble=any(m.weight_ensemble for m in methods), stochnorm=stochnorm,
                  description=" + ".join(m.description for m in methods),
                  default_alpha=base.default_alpha if base else None, term_weights=MappingProxyType(weights))
