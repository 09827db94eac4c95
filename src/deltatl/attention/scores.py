r"""DELTA supervised channel attention (Li et al., ICLR 2019, eq. 6), computed as the official code did.

The attention of channel :math:`j` of layer :math:`l` measures how much the loss of an L2-FE model
(pretrained backbone, trained new head) grows when that channel is zeroed:

.. math::

    d_{l,j} = \frac{1}{K} \sum_{k=1}^{K}
              \Bigl(\mathrm{CE}_k\bigl(z(x; \text{channel } j \text{ of } l \text{ zeroed})\bigr)
                    - \mathrm{CE}_k\bigl(z(x)\bigr)\Bigr),
    \qquad
    w_{l} = \operatorname{softmax}\Bigl(\frac{(d_l - \operatorname{mean} d_l) / \operatorname{std} d_l}{T}\Bigr)

with :math:`\mathrm{CE}_k` the mean cross-entropy of batch :math:`k` (eval mode), the population
standard deviation, and :math:`T = 5`. The weights are constants of the fine-tuning run.

Files: :func:`write_scores` / :func:`read_scores` store the raw :math:`d` (not the weights, so the
temperature can change without recomputing), in deltatl's JSON format or the official one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import DeltatlError
from ..features import FeatureHooks, _resolve_modules
from ..outputs import atomic_open
from .replay import CallOrder, ReplayPlan, call_order, plan_replay, replayed_prefix

__all__ = ["FORMAT", "METHODS", "channel_attention_scores", "check_replaceable_scores", "normalize_scores",
           "read_scores", "write_scores"]

FORMAT = "deltatl-attention-v1"
METHODS = ("exact", "naive", "first_order")

# Tolerance of the self-check of the "exact" method against a plain forward. Batch coupling bugs
# give errors of the order of the loss; the slack covers cuDNN/TF32 results that depend on the
# batch size.
_CHECK_RTOL, _CHECK_ATOL = 1e-2, 1e-3
# The exact path's group size cap: glibc serves allocations above its mmap threshold (at most 32 MiB)
# with fresh pages that the kernel faults in and zeroes on every use (BENCHMARKS.md, "Channel attention").
REPLICA_BUDGET_BYTES = 32 * 2**20


def normalize_scores(raw: Mapping[str, Tensor | Sequence[float]], temperature: float = 5.0) -> dict[str, Tensor]:
    r"""Turn raw loss differences into DELTA channel weights, per layer.

    .. math:: z_j = \frac{d_j - \bar d}{\sigma_d}, \qquad w_j = \frac{e^{z_j / T}}{\sum_i e^{z_i / T}}

    with :math:`\sigma_d` the population standard deviation. A layer whose scores are all equal
    (:math:`\sigma_d = 0`) gets uniform weights.

    Args:
        raw: layer name -> raw scores of shape (C,).
        temperature: :math:`T` (official: 5).

    Returns:
        layer name -> float32 weights of shape (C,), summing to 1.

    Raises:
        ValueError: a layer's scores are empty, not 1-D or not finite, or ``temperature <= 0``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    weights = {}
    for name, values in raw.items():
        # float64: z-scores of nearly equal scores are ratios of tiny differences.
        scores = torch.as_tensor(values).detach().cpu().to(torch.float64)
        if scores.dim() != 1 or scores.numel() == 0:
            raise ValueError(f"layer {name!r}: scores must be a non-empty 1-D sequence, got shape "
                             f"{tuple(scores.shape)}")
        if not torch.isfinite(scores).all():
            raise ValueError(f"layer {name!r}: scores contain NaN or infinity")
        if scores.max() == scores.min():
            # Test equality, not std == 0: the computed std of equal floats can be a tiny non-zero.
            layer_weights = torch.full_like(scores, 1.0 / scores.numel())
        else:
            z = (scores - scores.mean()) / scores.std(correction=0)
            layer_weights = torch.softmax(z / temperature, dim=0)
        weights[name] = layer_weights.float()
    return weights


def write_scores(path: str | os.PathLike[str], raw: Mapping[str, Tensor | Sequence[float]],
                 meta: Mapping[str, Any] | None = None) -> None:
    """Write raw scores as ``{"format": "deltatl-attention-v1", "layers": {name: [floats]}, "meta": {...}}``.

    The file is written to a temporary name and renamed, so readers never see a partial file.
    float32 scores round-trip exactly.

    Args:
        path: destination file.
        raw: layer name -> raw scores of shape (C,).
        meta: JSON-serialisable provenance (model, checkpoint, batches, method...).

    Raises:
        ValueError: a layer's scores are not 1-D or not finite.
    """
    layers = {}
    for name, values in raw.items():
        scores = torch.as_tensor(values).detach().cpu()
        if scores.dim() != 1:
            raise ValueError(f"layer {name!r}: scores must be 1-D, got shape {tuple(scores.shape)}")
        layers[name] = scores.double().tolist()
    # allow_nan=False: NaN/Infinity are not JSON and would break other readers.
    try:
        text = json.dumps({"format": FORMAT, "layers": layers, "meta": dict(meta or {})}, allow_nan=False)
    except ValueError:
        raise ValueError(f"{os.fspath(path)}: scores or meta contain NaN or infinity") from None
    with atomic_open(path, "w", encoding="utf-8") as file:
        file.write(text + "\n")


def _as_scores(path: str, name: str, values: Any) -> Tensor:
    if (not isinstance(values, list) or not values
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise ValueError(f"{path}: layer {name!r}: expected a non-empty list of numbers")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{path}: layer {name!r}: scores contain NaN or infinity")
    return torch.tensor(values, dtype=torch.float32)


def check_replaceable_scores(path: str) -> None:
    """Refuse to write scores to ``path`` unless it is new or an earlier deltatl attention file.

    Raises:
        DeltatlError: ``path`` is a folder, or a file deltatl did not write.
    """
    if os.path.isdir(path):
        raise DeltatlError(f"`output` {path} is a folder; give a file name")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            ours = json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise DeltatlError(f"`output` {path} exists and is not a deltatl attention file; choose another name")


def read_scores(path: str | os.PathLike[str], layers: Sequence[str] | None = None,
                channels: Mapping[str, int] | None = None) -> dict[str, Tensor]:
    """Read raw scores written by :func:`write_scores` or by the official DELTA code.

    The official file is a JSON list with one list of floats per hooked layer, in the order of the
    hooks, so its entries are mapped in order onto ``layers``.

    Args:
        path: the JSON file.
        layers: the layers the scores are for. Required for an official (list) file; for a deltatl
            file the names must be the same (in any order).
        channels: layer name -> expected channel count; each named layer must have that many scores.

    Returns:
        layer name -> float32 raw scores of shape (C,), in the order of ``layers`` if given, else of
        the file.

    Raises:
        ValueError: with one line naming the file (and layer): not JSON, unknown format, layer
            names or count differ from ``layers``, or a channel count differs from ``channels``.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as file:
        try:
            doc = json.load(file)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not a JSON file ({exc})") from None
    if isinstance(doc, list):
        if layers is None:
            raise ValueError(f"{path}: an official DELTA file (a list of {len(doc)} layers) has no layer "
                             "names: pass layers=[...] in hook order")
        if len(doc) != len(layers):
            raise ValueError(f"{path}: {len(doc)} layer entries, expected {len(layers)} for {list(layers)}")
        entries = dict(zip(layers, doc))
    elif isinstance(doc, dict) and doc.get("format") == FORMAT and isinstance(doc.get("layers"), dict):
        entries = doc["layers"]
        if layers is not None:
            missing = [name for name in layers if name not in entries]
            extra = [name for name in entries if name not in layers]
            if missing or extra:
                raise ValueError(f"{path}: layers differ from the expected ones: missing {missing}, "
                                 f"extra {extra}")
            entries = {name: entries[name] for name in layers}
    else:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{path}: unknown attention file format {found!r}, expected {FORMAT!r} "
                         "or an official DELTA list of lists")
    scores = {name: _as_scores(path, name, values) for name, values in entries.items()}
    for name, count in (channels or {}).items():
        if name not in scores:
            raise ValueError(f"{path}: no scores for layer {name!r}")
        if scores[name].numel() != count:
            raise ValueError(f"{path}: layer {name!r}: expected {count} channels, found {scores[name].numel()}")
    return scores


def _cross_entropy(logits: Any, labels: Tensor) -> Tensor:
    """Per-sample cross-entropy in float32, on the model's device."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"the model returned {type(logits).__name__}; channel attention needs a model "
                        "that returns logits (call it in eval mode)")
    return F.cross_entropy(logits.float(), labels, reduction="none")


def _batch_loss(logits: Any, labels: Tensor, replicas: int = 1) -> Tensor:
    """Mean cross-entropy of each of ``replicas`` consecutive equal-size groups, as float64 on CPU.

    Loss differences are small differences of large numbers; float64 keeps the averaging from adding
    to the float32 rounding of the forward itself (and the CPU has float64 where MPS has not).
    """
    return _cross_entropy(logits, labels).cpu().double().view(replicas, -1).mean(dim=1)


def _plain_forward(model: nn.Module, modules: Mapping[str, nn.Module],
                   images: Tensor) -> tuple[Any, dict[str, torch.Size]]:
    """The model output and the output shape of each scored layer.

    Only shapes are recorded: unlike :class:`FeatureHooks`, this accepts layers whose output is later
    modified in place (``bn2`` before ``out += identity``). Masking such a layer is still exact, since
    the masking hooks return a new tensor and the in-place operation then applies to that one.
    """
    shapes: dict[str, torch.Size] = {}

    def make_hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if not isinstance(output, Tensor) or output.dim() < 2:
                raise ValueError(f"layer {name!r} must output a tensor with a channel dimension (dim 1)")
            shapes[name] = output.shape
        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    try:
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in modules if name not in shapes]
    if missing:
        raise ValueError(f"layer(s) {missing} did not run in the model's forward")
    return logits, shapes


def _zero_channel_hook(channel: list[int]) -> Callable[[nn.Module, Any, Tensor], Tensor]:
    """Forward hook returning the output with channel ``channel[0]`` zeroed (a cell, so one hook
    serves every channel)."""
    def hook(_module: nn.Module, _args: Any, output: Tensor) -> Tensor:
        return output.index_fill(1, torch.tensor(channel, device=output.device), 0)
    return hook


def _naive_diffs(model: nn.Module, module: nn.Module, images: Tensor, labels: Tensor, loss0: Tensor,
                 num_channels: int) -> Tensor:
    """One full forward per channel (reference implementation)."""
    channel = [0]
    handle = module.register_forward_hook(_zero_channel_hook(channel))
    try:
        diffs = []
        for j in range(num_channels):
            channel[0] = j
            diffs.append(_batch_loss(model(images), labels) - loss0)
    finally:
        handle.remove()
    return torch.cat(diffs)


class _ExpansionError(RuntimeError):
    """The replicas did not reach the hooked layer, or the model output, as expected."""


def _replicate(value: Any, batch: int, replicas: int) -> Any:
    """Repeat a batch-major tensor ``replicas`` times along dim 0 (replica-major); other values as is."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.repeat(replicas, *([1] * (value.dim() - 1)))
    return value


def _replica_losses(model: nn.Module, module: nn.Module, expand_at: nn.Module | None, images: Tensor,
                    labels: Tensor, channels: Sequence[int | None]) -> Tensor:
    """Mean cross-entropy of M = len(channels) replicas of the batch, replica k with channel
    ``channels[k]`` of ``module``'s output zeroed (None: nothing zeroed), in one forward.

    The batch is replicated at the input of ``expand_at`` (an ancestor of ``module``), or at the output
    of ``module`` itself if None. Everything before that point runs once on B samples, everything
    after it on M * B.
    """
    batch, replicas = images.shape[0], len(channels)

    def mask_hook(_module: nn.Module, _args: Any, output: Tensor) -> Tensor:
        if expand_at is None:
            output = _replicate(output, batch, replicas)
        if output.shape[0] != replicas * batch:
            raise _ExpansionError(f"expected {replicas * batch} samples at the layer, got {output.shape[0]}")
        zero = torch.zeros(replicas, output.shape[1], dtype=torch.bool)
        masked = [(k, channel) for k, channel in enumerate(channels) if channel is not None]
        if masked:
            zero[tuple(zip(*masked))] = True
        # (M, 1, C, 1, 1) against the (M, B, C, H, W) view: replica k loses its own channel only.
        zero = zero.view(replicas, 1, output.shape[1], *([1] * (output.dim() - 2))).to(output.device)
        return output.unflatten(0, (replicas, batch)).masked_fill(zero, 0).flatten(0, 1)

    def expand_hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return (tuple(_replicate(a, batch, replicas) for a in args),
                {k: _replicate(v, batch, replicas) for k, v in kwargs.items()})

    handles = [module.register_forward_hook(mask_hook)]
    if expand_at is not None:
        handles.append(expand_at.register_forward_pre_hook(expand_hook, with_kwargs=True))
    try:
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(logits, Tensor) or logits.shape[0] != replicas * batch:
        raise _ExpansionError("the model output does not have one row per replicated sample")
    return _batch_loss(logits, labels.repeat(replicas), replicas)


def _expansion_point(model: nn.Module, layer: str, images: Tensor, labels: Tensor,
                     loss0: Tensor) -> nn.Module | None:
    """Find where the batch can be replicated for ``layer`` without changing any result.

    Replicating the layer's own output is cheapest but fails when a tensor computed before the layer
    joins the path after it (a residual shortcut sees B samples, the branch M * B). Replicating the
    input of an enclosing module that contains both ends (``layer1.2`` for ``layer1.2.conv3``) avoids
    that; the model input always works. Candidates are tried from the layer upwards; each is accepted
    if a two-replica forward (nothing zeroed / channel 0 zeroed) reproduces the plain forward and a
    naive forward with channel 0 zeroed.
    """
    modules = dict(model.named_modules())
    module = modules[layer]
    naive0 = _batch_loss(_forward_with_hook(model, module, images, 0), labels)
    parts = layer.split(".")
    ancestors = [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]
    candidates: list[nn.Module | None] = [None] + [modules[name] for name in ancestors]
    expected = torch.cat([loss0, naive0])
    error: RuntimeError | None = None
    for expand_at in candidates:
        try:
            losses = _replica_losses(model, module, expand_at, images, labels, [None, 0])
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError only exists from torch 2.5
            raise
        except RuntimeError as exc:  # shape mismatch between replicated and non-replicated tensors
            error = exc
            continue
        if torch.allclose(losses, expected, rtol=_CHECK_RTOL, atol=_CHECK_ATOL):
            return expand_at
        error = None
    raise RuntimeError(f"method='exact' cannot reproduce plain forward passes for layer {layer!r} even "
                       "when replicating the model input; use method='naive'") from error


def _forward_with_hook(model: nn.Module, module: nn.Module, images: Tensor, channel: int) -> Any:
    handle = module.register_forward_hook(_zero_channel_hook([channel]))
    try:
        return model(images)
    finally:
        handle.remove()


def _checked_replay(model: nn.Module, layer: str, point: nn.Module | None, order: CallOrder, images: Tensor,
                    labels: Tensor, loss0: Tensor) -> ReplayPlan:
    """The replay plan for ``layer`` replicated at ``point``, if a replayed forward with nothing zeroed
    reproduces the plain one; else a plan that replays nothing. (A replayed output is a copy: a model
    that later changes one module's output in place through a view of another's would differ.)"""
    names = {id(m): n for n, m in model.named_modules()}
    plan = (plan_replay(order, layer, at_exit=True) if point is None
            else plan_replay(order, names[id(point)], at_exit=False))
    if not plan.modules:
        return plan
    with replayed_prefix(model, plan, images):
        replayed = _replica_losses(model, model.get_submodule(layer), point, images, labels, [None])
    if torch.allclose(replayed, loss0, rtol=_CHECK_RTOL, atol=_CHECK_ATOL):
        return plan
    return dataclasses.replace(plan, modules=(), skips_prefix=False)


def _group_size(plan: ReplayPlan, batch: int, masks_per_forward: int, budget_bytes: int | None) -> int:
    """Channels per replicated forward: ``masks_per_forward``, lowered so that the largest replicated
    activation stays within ``budget_bytes`` when the part before the replication point is replayed
    (then small groups cost no recomputation, and large activations cost page faults and cache misses:
    BENCHMARKS.md, "Channel attention")."""
    if budget_bytes is None or not plan.skips_prefix or plan.suffix_sample_numel == 0:
        return masks_per_forward
    per_replica = plan.suffix_sample_numel * batch * 4  # float32
    return max(1, min(masks_per_forward, budget_bytes // per_replica))


def _exact_diffs(model: nn.Module, module: nn.Module, expand_at: nn.Module | None, plan: ReplayPlan,
                 images: Tensor, labels: Tensor, loss0: Tensor, num_channels: int, group: int) -> Tensor:
    diffs = []
    with replayed_prefix(model, plan, images):
        for start in range(0, num_channels, group):
            channels = list(range(start, min(start + group, num_channels)))
            diffs.append(_replica_losses(model, module, expand_at, images, labels, channels) - loss0)
    return torch.cat(diffs)


def _first_order_diffs(model: nn.Module, hooks: FeatureHooks, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
    r"""First-order Taylor estimate of every channel's loss change, from one forward and one backward.

    Zeroing channel :math:`j` moves the activation :math:`A` by :math:`-A_{:,j}`, so

    .. math:: \Delta L_j \approx -\sum_{b,h,w} A_{b,j,h,w}\,\frac{\partial L}{\partial A_{b,j,h,w}}

    with :math:`L` the batch-mean cross-entropy. Exact when the loss is linear in the activation;
    otherwise the error is of second order in the zeroed channel.
    """
    # The input requires grad so every activation is in the graph even with a frozen backbone;
    # autograd.grad then computes only what the hooked activations need, and no parameter .grad.
    images = images.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = _cross_entropy(model(images), labels).mean()
        features = hooks.pop()
        grads = torch.autograd.grad(loss, list(features.values()))
    diffs = {}
    for (name, activation), grad in zip(features.items(), grads):
        dims = [d for d in range(activation.dim()) if d != 1]
        diffs[name] = -(activation.detach().float() * grad.float()).sum(dim=dims).cpu().double()
    return diffs


class _ExactPlanner:
    """Where the exact path replicates each layer's batch and what it replays, found once per layer on
    the first batch. A batch of one broadcasts against its replicas, so a point found with B = 1 may not
    work for B > 1: the two cases are planned separately."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.order: CallOrder | None = None
        self.plans: dict[tuple[str, bool], tuple[nn.Module | None, ReplayPlan]] = {}

    def plan(self, layer: str, images: Tensor, labels: Tensor, loss0: Tensor) -> tuple[nn.Module | None, ReplayPlan]:
        key = (layer, images.shape[0] == 1)
        if key not in self.plans:
            point = _expansion_point(self.model, layer, images, labels, loss0)
            self.order = self.order or call_order(self.model, images)
            self.plans[key] = point, _checked_replay(self.model, layer, point, self.order, images, labels, loss0)
        return self.plans[key]


def _zeroing_diffs(model: nn.Module, modules: Mapping[str, nn.Module], layers: Sequence[str], images: Tensor,
                   labels: Tensor, method: str, planner: _ExactPlanner, masks_per_forward: int,
                   replica_budget_bytes: int | None, bar: tqdm) -> dict[str, Tensor]:
    """One batch's loss increases of every channel of ``layers``, by zeroing (``"naive"`` or ``"exact"``)."""
    diffs = {}
    with torch.no_grad():
        logits, shapes = _plain_forward(model, modules, images)
        loss0 = _batch_loss(logits, labels)
        for name in layers:
            if method == "naive":
                diffs[name] = _naive_diffs(model, modules[name], images, labels, loss0, shapes[name][1])
            else:
                point, plan = planner.plan(name, images, labels, loss0)
                group = _group_size(plan, images.shape[0], masks_per_forward, replica_budget_bytes)
                diffs[name] = _exact_diffs(model, modules[name], point, plan, images, labels, loss0,
                                           shapes[name][1], group)
            bar.update(1)
    return diffs


def channel_attention_scores(model: nn.Module, layers: Sequence[str], batches: Iterable[tuple[Tensor, Tensor]],
                             method: str = "exact", masks_per_forward: int = 64,
                             progress: bool = True, replica_budget_bytes: int | None = REPLICA_BUDGET_BYTES,
                             ) -> dict[str, Tensor]:
    r"""Raw DELTA channel scores :math:`d_{l,j}`: the loss increase when channel j of layer l is zeroed.

    For every batch, :math:`d_{l,j} = \mathrm{CE}(\text{channel } j \text{ of } l \text{ zeroed}) -
    \mathrm{CE}(\text{plain})`, with CE the batch-mean cross-entropy; the result is the unweighted
    mean over the batches (as the official code: K = 4 batches of 32 training images with train
    augmentation). The model runs in eval mode (each module's mode is restored afterwards), without
    gradients except for ``"first_order"``. Channels are zeroed at the layer's output with a forward
    hook; the official code zeroed conv filters, which is the same for a bias-free convolution, and
    hooks also handle layers that are not convolutions (Inception's ``Mixed_5d``).

    Methods:

    - ``"naive"``: one full forward per (layer, channel). The reference.
    - ``"exact"`` (default): the same numbers, faster. Zeroing a channel of layer l changes nothing
      before l, so for each group of ``masks_per_forward`` channels the batch is replicated once per
      channel, each replica gets its own channel zeroed, and the rest of the network runs once on the
      replicated batch. The replication happens at the layer output when possible, else at the input
      of the smallest enclosing module for which it reproduces plain forwards (``layer1.2`` for
      ``layer1.2.conv3``: the residual shortcut must be replicated too), else at the model input;
      this is found once per layer on the first batch, with a check against a plain and a naive
      forward. What comes before that point is computed once per batch and replayed
      (:mod:`deltatl.attention.replay`), so each group costs only the rest of the network; groups are
      capped so that the largest replicated activation stays within ``replica_budget_bytes``. Peak
      memory: a forward on (group size x B) samples from that point on.
    - ``"first_order"``: one forward and backward per batch for all layers at once, with the
      first-order Taylor estimate :math:`d_{l,j} \approx -\sum_{b,h,w} A_{b,j,h,w}\,
      \partial L / \partial A_{b,j,h,w}` (activation times gradient). An approximation: zeroing a
      channel is not a small change, so it ranks channels like the exact scores only roughly. The
      layers' outputs must not be modified in place later in the forward (checked).

    Args:
        model: the L2-FE model (pretrained backbone, trained head), returning logits.
        layers: module names whose output channels are scored.
        batches: ``(images, labels)`` pairs, moved to the model's device.
        method: ``"exact"``, ``"naive"`` or ``"first_order"``.
        masks_per_forward: at most this many channels per batched forward (``"exact"`` only).
        replica_budget_bytes: largest replicated activation a group may reach (``"exact"``; None: no
            cap, groups of ``masks_per_forward``).
        progress: show a progress bar over batches x layers.

    Returns:
        layer name -> float32 CPU tensor of shape (C_l,), in the order of ``layers``.

    Raises:
        ValueError: unknown layer or method, ``masks_per_forward < 1``, or no batches.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if masks_per_forward < 1:
        raise ValueError(f"masks_per_forward must be at least 1, got {masks_per_forward}")
    modules = _resolve_modules(model, list(layers))
    device = next(model.parameters()).device
    total = len(batches) * len(layers) if isinstance(batches, Sized) else None
    modes = {m: m.training for m in model.modules()}
    sums: dict[str, Tensor] = {}
    planner = _ExactPlanner(model)
    num_batches = 0
    bar = tqdm(total=total, disable=not progress, desc=f"channel attention ({method})", unit="layer")
    # Only the gradient method needs the activations themselves; on the masked forwards these hooks
    # would only keep replicated outputs alive.
    gradient_hooks = FeatureHooks(model, layers) if method == "first_order" else None
    try:
        model.eval()
        for images, labels in batches:
            images, labels = images.to(device), labels.to(device)
            if gradient_hooks is not None:
                diffs = _first_order_diffs(model, gradient_hooks, images, labels)
                bar.update(len(layers))
            else:
                diffs = _zeroing_diffs(model, modules, layers, images, labels, method, planner,
                                       masks_per_forward, replica_budget_bytes, bar)
            for name in layers:
                sums[name] = sums[name] + diffs[name] if name in sums else diffs[name]
            num_batches += 1
    finally:
        if gradient_hooks is not None:
            gradient_hooks.close()
        bar.close()
        for module, mode in modes.items():
            module.training = mode
    if num_batches == 0:
        raise ValueError("no batches given")
    return {name: (sums[name] / num_batches).float() for name in layers}
