r"""The regularization terms of DELTA, L2-SP and L2 as pure functions: unweighted float32 scalars
(the caller applies alpha, beta).

All terms are computed in float32 whatever the dtype of their inputs, and use squared norms (the
gradient of :math:`\|w - w^*\|` is undefined at the starting point, where L2-SP starts).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["DELTA_REDUCTIONS", "delta_distance", "l2_penalty", "l2sp_penalty", "source_energy"]

DELTA_REDUCTIONS = ("sum", "mean", "relative")


def _sum(terms: Iterable[Tensor]) -> Tensor:
    """Sum of scalars on their own device (no CPU start value that would force a device choice)."""
    total = None
    for term in terms:
        total = term if total is None else total + term
    return torch.zeros((), dtype=torch.float32) if total is None else total


def _check_same_keys(what: str, found: Iterable[str], expected: Iterable[str]) -> None:
    found, expected = list(found), list(expected)
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    if missing or extra:
        raise ValueError(f"{what} do not match the target feature layers: missing {missing}, extra {extra}")


def _squared_error_per_channel(name: str, target: Tensor, source: Tensor) -> Tensor:
    """``mean_hw (target - source)^2`` of shape (B, C), in float32, with ``source`` a constant."""
    if target.shape != source.shape:
        raise ValueError(f"layer {name!r}: target features {tuple(target.shape)} and source features "
                         f"{tuple(source.shape)} differ in shape")
    if target.dim() not in (2, 4):
        raise ValueError(f"layer {name!r}: features must be (B, C) or (B, C, H, W), got {tuple(target.shape)}")
    # Cast before any arithmetic: squares and spatial means accumulated in bf16 (8-bit mantissa) or
    # fp16 (overflow above 65504) would be inaccurate, and autograd then runs the backward in float32.
    squared = (target.float() - source.detach().float()).square()
    # mean over (H, W) instead of a reshape to (B, C, H*W): no copy for channels_last tensors.
    return squared.mean(dim=(-2, -1)) if squared.dim() == 4 else squared


def source_energy(features: Tensor) -> Tensor:
    r"""``sum_b sum_j mean_hw FM^2`` of a feature map (B, C, H, W) or (B, C): the denominator of
    DELTA's ``"relative"`` term, a float32 constant (no gradient)."""
    squared = features.detach().float().square()
    return squared.mean(dim=(-2, -1)).sum() if squared.dim() == 4 else squared.sum()


def delta_distance(target_features: Mapping[str, Tensor], source_features: Mapping[str, Tensor],
                   channel_weights: Mapping[str, Tensor] | None = None, reduction: str = "sum",
                   energies: Mapping[str, Tensor] | None = None) -> Tensor:
    r"""DELTA feature-map distance between the target and the frozen source network (official form).

    .. math::

        \Omega = \sum_l \frac{1}{2} \sum_{b=1}^{B} \sum_{j=1}^{C_l} C_l\, w_{l,j}\,
                 \operatorname{mean}_{h,w}\bigl(FM^t_{l}[b,j,h,w] - FM^s_{l}[b,j,h,w]\bigr)^2

    The weights of a layer sum to 1, so :math:`C_l w_{l,j}` averages 1. With ``channel_weights=None``
    the weights are uniform, :math:`w_{l,j} = 1/C_l`, and the term is half the sum over the batch and
    the channels of the per-channel spatial mean squared error ("DELTA w/o ATT"). deltatl uses this same
    normalisation with and without attention, so alpha carries over between the two. The official
    no-attention ablation instead used :math:`\frac{1}{2}\|FM^t - FM^s\|^2` (no spatial mean, no
    :math:`C_l`), a scale that grows with :math:`H_l W_l`; its alpha values do not transfer.

    ``reduction="sum"`` (default, official) sums over the batch, so the paper's alpha = 0.01 applies
    at the official batch size of 64; ``"mean"`` divides by B, making alpha independent of the batch
    size (alpha_mean = 64 * alpha_sum reproduces the official scale at batch 64).

    ``reduction="relative"`` divides each layer's summed term by the source's summed squared
    activation on the same batch (a constant):

    .. math::

        \Omega^{rel} = \sum_l \frac{1}{2}\,
            \frac{\sum_b \sum_j C_l\, w_{l,j}\, \operatorname{mean}_{h,w}(FM^t_l - FM^s_l)^2}
                 {\sum_b \sum_j \operatorname{mean}_{h,w} (FM^s_l)^2}

    so each layer contributes half its relative squared error (with uniform weights exactly
    :math:`\frac{1}{2}\|FM^t_l - FM^s_l\|^2 / \|FM^s_l\|^2`). The term then does not depend on the
    batch size, the number of channels, the spatial size or the scale of a layer's activations, so one
    alpha means the same on every architecture, image size and batch (the official ``"sum"`` scale
    moved by a factor of about 10^4 between deltatl's models and inputs).

    Distributed data parallel with P processes of local batch b: each process sums over its own b
    samples, and DDP *averages* the gradients, so the effective gradient is 1/P of that of the sum over
    the global batch B = P * b. The engine multiplies this term by P (with ``"sum"``) to keep the
    single-process meaning of a batch of B. With ``"mean"`` no scaling is needed. With ``"relative"``
    the engine passes ``energies`` summed over the processes and scales by P as for ``"sum"``, so the
    step equals the single-process step on the global batch.

    Args:
        target_features: layer name -> target feature map (B, C, H, W) or (B, C), any float dtype.
        source_features: the same layers from the source network on the same batch; treated as
            constants (detached).
        channel_weights: layer name -> non-negative weights of shape (C,) summing to 1 (DELTA's
            channel attention, see :func:`deltatl.attention.normalize_scores`), or None for uniform.
        reduction: ``"sum"`` or ``"mean"`` over the batch, or ``"relative"`` (see above).
        energies: ``"relative"`` only: layer name -> the denominator (default
            :func:`source_energy` of the source features; under DDP its sum over the processes).

    Returns:
        A float32 scalar.

    Raises:
        ValueError: the layer names of the three mappings differ (the message names the missing and
            extra layers), shapes do not match, or ``reduction`` is unknown.
    """
    if reduction not in DELTA_REDUCTIONS:
        raise ValueError(f"reduction must be one of {DELTA_REDUCTIONS}, got {reduction!r}")
    if not target_features:
        raise ValueError("no target feature maps given")
    _check_same_keys("source feature layers", source_features, target_features)
    if channel_weights is not None:
        _check_same_keys("channel weight layers", channel_weights, target_features)
    layer_terms = []
    for name, target in target_features.items():
        source = source_features[name]
        per_channel = _squared_error_per_channel(name, target, source)
        num_channels = per_channel.shape[1]
        if channel_weights is None:
            per_sample = per_channel.sum(dim=1)  # C * (1/C) = 1 for every channel
        else:
            weights = channel_weights[name]
            if weights.shape != (num_channels,):
                raise ValueError(f"layer {name!r}: channel weights of shape {tuple(weights.shape)}, "
                                 f"expected ({num_channels},)")
            scale = num_channels * weights.detach().to(device=per_channel.device, dtype=torch.float32)
            per_sample = (per_channel * scale).sum(dim=1)  # not a matmul: autocast would run that in low precision
        layer_term = 0.5 * per_sample.sum()
        if reduction == "mean":
            layer_term = layer_term / per_channel.shape[0]
        elif reduction == "relative":
            energy = source_energy(source) if energies is None else energies[name].detach().float()
            layer_term = layer_term / energy.clamp_min(torch.finfo(torch.float32).tiny)
        layer_terms.append(layer_term)
    return _sum(layer_terms)


def l2sp_penalty(params: Sequence[Tensor], anchors: Sequence[Tensor]) -> Tensor:
    r"""L2-SP: squared distance of the shared parameters from their starting point.

    .. math:: \Omega = \sum_i \frac{1}{2} \|w_i - w_i^*\|_2^2, \qquad
              \frac{\partial \Omega}{\partial w_i} = w_i - w_i^*

    Args:
        params: the live parameters.
        anchors: their starting points (same order and shapes), treated as constants.

    Returns:
        A float32 scalar (float32 accumulation for low-precision parameters); 0 if ``params`` is empty.

    Raises:
        ValueError: the two sequences differ in length or a pair differs in shape.
    """
    if len(params) != len(anchors):
        raise ValueError(f"{len(params)} parameters but {len(anchors)} anchors")
    for i, (param, anchor) in enumerate(zip(params, anchors)):
        if param.shape != anchor.shape:
            raise ValueError(f"parameter {i}: shape {tuple(param.shape)}, anchor {tuple(anchor.shape)}")
    # (p - p0).square().sum(), not norm()**2, whose gradient is NaN at p == p0.
    return _sum(0.5 * (p.float() - a.detach().float()).square().sum() for p, a in zip(params, anchors))


def l2_penalty(params: Iterable[Tensor]) -> Tensor:
    r"""Plain weight decay as a loss term (the new head in L2-SP and DELTA).

    .. math:: \Omega = \sum_i \frac{1}{2} \|w_i\|_2^2, \qquad \frac{\partial \Omega}{\partial w_i} = w_i

    Args:
        params: the parameters to shrink towards zero.

    Returns:
        A float32 scalar; 0 if ``params`` is empty.
    """
    return _sum(0.5 * p.float().square().sum() for p in params)
