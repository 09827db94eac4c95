"""Capturing intermediate feature maps by module name, and which layers DELTA regularizes.

:class:`FeatureHooks` taps the outputs of named modules with forward hooks. It works for any
``nn.Module`` (timm, torchvision, custom) and at any module granularity, e.g. the ``conv3`` of the last
bottleneck of a stage, which is what the official DELTA code regularizes.

:func:`layer_preset` returns the layers to tap: the official DELTA lists for ResNet-50/101 and
Inception-V3, and an automatic analogue ("the last convolution of the last block of each stage") for
any other CNN.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .errors import DeltatlError

__all__ = ["FeatureHooks", "OFFICIAL_PRESETS", "auto_layer_preset", "layer_preset"]


class UnknownLayerError(DeltatlError, ValueError):
    """A layer name the model does not have (a user's ``--delta-layers``): one line on the command line."""


def _unknown_layers_message(unknown: Sequence[str], valid: Sequence[str], limit: int = 40) -> str:
    """One message for unknown module names: close matches first, then (a prefix of) the valid names."""
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=5, cutoff=0.6)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        parts.append(f"{name!r}{hint}")
    shown = ", ".join(repr(v) for v in valid[:limit])
    more = f", ... ({len(valid) - limit} more)" if len(valid) > limit else ""
    return f"unknown layer name(s): {'; '.join(parts)}. Valid module names: {shown}{more}"


def _resolve_modules(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """Map layer names to modules of ``model``, raising ``ValueError`` on unknown or repeated names."""
    if isinstance(layers, str):
        raise TypeError("layers must be a sequence of module names, not a single string")
    if len(set(layers)) != len(layers):
        raise ValueError(f"repeated layer names in {list(layers)}")
    modules = dict(model.named_modules())
    unknown = [name for name in layers if name not in modules]
    if unknown:
        # The root module's name is '' and would only clutter the list.
        raise UnknownLayerError(_unknown_layers_message(unknown, [n for n in modules if n]))
    return {name: modules[name] for name in layers}


def _version_of(tensor: Tensor) -> int | None:
    """The in-place version counter, or None for inference tensors (they have none and cannot be
    mutated outside inference mode anyway)."""
    return None if tensor.is_inference() else tensor._version


class FeatureHooks:
    """Forward hooks capturing the outputs of named modules.

    The hooks are registered once, in ``__init__`` (torch.compile recompiles when hooks change), and
    removed by :meth:`close` or on leaving a ``with`` block. Every forward of ``model`` stores each
    hooked module's output under its name; :meth:`pop` returns these tensors and clears the store, so
    features of one step can never be read at a later step. A module that runs twice in one forward
    keeps its last output.

    The captured tensors are references, not copies (gradients flow through them, no memory is
    spent). The price is that an in-place operation run *after* the hooked module (``out += identity``
    in torchvision's ``BasicBlock`` / ``Bottleneck``, ``ReLU(inplace=True)``) silently changes a
    captured tensor. Each tensor's version counter is therefore recorded at capture and checked by
    :meth:`pop`, which raises ``RuntimeError`` naming the layer if it moved.

    Distributed training: build the hooks on the bare model, then wrap it in
    ``DistributedDataParallel``. DDP's forward calls the inner modules, so the hooks fire unchanged.

    Example::

        with FeatureHooks(model, ["layer1.2.conv3", "layer4.2.conv3"]) as hooks:
            logits = model(images)
            features = hooks.pop()   # {"layer1.2.conv3": Tensor, "layer4.2.conv3": Tensor}

    Args:
        model: the model to tap (its modules, not a copy).
        layers: names of modules of ``model`` as given by ``model.named_modules()``.

    Raises:
        ValueError: a name is not a module of ``model`` (the message lists close matches and the
            valid names), or a name is repeated.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        modules = _resolve_modules(model, layers)
        self.layers: tuple[str, ...] = tuple(layers)
        self._captured: dict[str, tuple[Tensor, int | None]] = {}
        self._handles: list[RemovableHandle] = [
            module.register_forward_hook(self._make_hook(name)) for name, module in modules.items()
        ]

    def _make_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(f"layer {name!r} returned {type(output).__name__}, not a Tensor: "
                                "hook a module whose output is a single tensor")
            self._captured[name] = (output, _version_of(output))
        return hook

    @property
    def num_hooks(self) -> int:
        """Number of registered hooks (one per layer until :meth:`close`, then zero)."""
        return len(self._handles)

    def pop(self) -> dict[str, Tensor]:
        """Return the features captured since the last call, keyed by layer name, and clear them.

        Returns:
            ``{layer: output}`` in the order of ``self.layers``.

        Raises:
            RuntimeError: a layer did not run since the last call, or its output was modified in
                place after capture. The store is cleared in both cases.
        """
        captured, self._captured = self._captured, {}
        missing = [name for name in self.layers if name not in captured]
        if missing:
            raise RuntimeError(f"no output captured for layer(s) {missing} since the last pop(): "
                               "did the model run a forward pass, and do these modules run in it?")
        features = {}
        for name in self.layers:
            tensor, version = captured[name]
            if version is not None and tensor._version != version:
                raise RuntimeError(
                    f"the output of layer {name!r} was modified in place after it was captured "
                    f"(e.g. by 'out += identity' or an inplace ReLU), so it no longer holds that "
                    f"layer's output: hook a different module, e.g. the convolution before it")
            features[name] = tensor
        return features

    def clear(self) -> None:
        """Drop captured features without reading them (e.g. after an evaluation forward)."""
        self._captured = {}

    def close(self) -> None:
        """Remove the hooks and drop captured features. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._captured = {}

    def __enter__(self) -> FeatureHooks:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


#: Official DELTA layers (authors' code): the raw output of ``conv3`` of the last bottleneck of each
#: stage for ResNets, module outputs for Inception-V3. timm and torchvision use the same module names
#: for these three architectures.
OFFICIAL_PRESETS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "resnet50": ("layer1.2.conv3", "layer2.3.conv3", "layer3.5.conv3", "layer4.2.conv3"),
    "resnet101": ("layer1.2.conv3", "layer2.3.conv3", "layer3.22.conv3", "layer4.2.conv3"),
    "inception_v3": ("Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e"),
})

# Older timm names of the same architectures (now pretrained tags such as ``inception_v3.tf_in1k``).
_ALIASES = {"tv_resnet50": "resnet50", "tv_resnet101": "resnet101", "tf_inception_v3": "inception_v3",
            "adv_inception_v3": "inception_v3", "gluon_inception_v3": "inception_v3"}


def _architecture(model_name: str) -> str:
    """``'hf-hub:timm/resnet50.a1_in1k'``, ``'torchvision/resnet50'``, ``'resnet50'`` -> ``'resnet50'``."""
    name = re.split(r"[/:]", model_name.strip().lower())[-1]
    name = name.split(".", 1)[0]  # timm pretrained tag
    return _ALIASES.get(name, name)


def layer_preset(model: nn.Module, model_name: str, *,
                 input_size: tuple[int, int, int] | None = None) -> list[str]:
    """The layers whose feature maps DELTA regularizes for this model.

    ResNet-50, ResNet-101 and Inception-V3 (timm or torchvision, any pretrained tag) get the lists of
    the official code (:data:`OFFICIAL_PRESETS`); every other model gets :func:`auto_layer_preset`.

    Args:
        model: the model (its module names are checked).
        model_name: architecture name as given to timm or torchvision, e.g. ``'resnet101'``,
            ``'resnet50.a1_in1k'``, ``'torchvision/inception_v3'``.
        input_size: ``(C, H, W)`` of the probe forward of :func:`auto_layer_preset`.

    Raises:
        ValueError: the model lacks a layer of its official list (the name does not describe the
            model), or no layer can be chosen automatically.
    """
    preset = OFFICIAL_PRESETS.get(_architecture(model_name))
    if preset is None:
        return auto_layer_preset(model, input_size=input_size)
    modules = dict(model.named_modules())
    missing = [name for name in preset if name not in modules]
    if missing:
        raise ValueError(f"model_name {model_name!r} selects the official DELTA layers {list(preset)}, "
                         f"but the model has no module(s) {missing}")
    return list(preset)


@dataclass
class _Record:
    """One module's output in the probe forward."""

    name: str
    module: nn.Module
    shape: torch.Size
    data_ptr: int
    version: int
    tensor: Tensor | None  # kept alive for convolutions only (see _probe)


def _probe(model: nn.Module, input_size: tuple[int, int, int] | None) -> list[_Record]:
    """Run one forward on a dummy batch of one and record every module's tensor output, in the order
    the modules finished.

    Convolution outputs are kept alive until the end, so no other tensor can reuse their memory: an
    output at the same address later in the forward is then the same tensor, modified in place.
    """
    params = next(model.parameters())  # the caller checked that there is a Conv2d
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        if "input_size" in cfg:
            input_size = tuple(cfg["input_size"])
        else:
            first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
            input_size = (first_conv.in_channels, 224, 224)
    records: list[_Record] = []

    def make_hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, _args: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                keep = output if isinstance(module, nn.Conv2d) else None
                records.append(_Record(name, module, output.shape, output.data_ptr(),
                                       output._version, keep))
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in model.named_modules()]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_size), dtype=params.dtype, device=params.device))
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return records


def _within(name: str, scope: str) -> bool:
    return name == scope or name.startswith(scope + ".")


def _stage_tap(records: list[_Record], stage: str) -> str | None:
    """The layer to tap for one stage: the last convolution run inside it whose output has the
    stage's spatial size (so squeeze-excitation convolutions on pooled vectors are skipped), or the
    in-place module that last modified that convolution's output."""
    convs = [i for i, r in enumerate(records) if isinstance(r.module, nn.Conv2d) and _within(r.name, stage)]
    if not convs:
        return None
    outputs = [r for r in records if r.name == stage]
    if outputs and len(outputs[-1].shape) == 4:
        same_size = [i for i in convs if records[i].shape[-2:] == outputs[-1].shape[-2:]]
        convs = same_size or convs
    index = convs[-1]
    conv = records[index]
    assert conv.tensor is not None  # kept alive for every convolution by _probe
    final_version = conv.tensor._version
    if final_version == conv.version:
        return conv.name
    # E.g. VGG's Conv2d followed by ReLU(inplace=True): the ReLU module returns the conv's tensor.
    for later in records[index + 1:]:
        if later.data_ptr == conv.data_ptr and later.shape == conv.shape and later.version == final_version:
            return later.name
    raise ValueError(f"the output of {conv.name!r}, the last convolution of stage {stage!r}, is "
                     "modified in place later in the forward; pass the layers explicitly")


def _contains_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def _structural_stages(model: nn.Module, records: list[_Record]) -> list[str]:
    """Stages of a model without ``feature_info``: the last child (containing a convolution) of each
    run of children with the same output spatial size, in execution order.

    The children are those of the "trunk": starting at the root, descend while exactly one child
    contains convolutions (``features`` of torchvision's VGG, MobileNet, EfficientNet).
    """
    trunk, prefix = model, ""
    while True:
        with_conv = [(n, c) for n, c in trunk.named_children() if _contains_conv(c)]
        if len(with_conv) != 1:
            break
        name, trunk = with_conv[0]
        prefix = f"{prefix}.{name}" if prefix else name
    children = {f"{prefix}.{n}" if prefix else n: c for n, c in trunk.named_children()}
    ran = [r for r in records if r.name in children and len(r.shape) == 4]
    stages: list[str] = []
    size, last_in_run = None, None
    for record in ran:
        if record.shape[-2:] != size:
            if last_in_run is not None:
                stages.append(last_in_run)
            size, last_in_run = record.shape[-2:], None
        if _contains_conv(record.module):
            last_in_run = record.name
    if last_in_run is not None:
        stages.append(last_in_run)
    return stages


def _feature_info_stages(model: nn.Module) -> list[str] | None:
    """Module names of timm's ``feature_info``, or None if absent or not names of ``model``'s modules
    (``features_only`` wrappers rename modules)."""
    info = getattr(model, "feature_info", None)
    if info is None:
        return None
    entries = info.get_dicts() if hasattr(info, "get_dicts") else info
    try:
        stages = [entry["module"] for entry in entries]
    except (TypeError, KeyError):
        return None
    modules = dict(model.named_modules())
    return stages if stages and all(s in modules for s in stages) else None


def auto_layer_preset(model: nn.Module, num_layers: int = 4, *,
                      input_size: tuple[int, int, int] | None = None) -> list[str]:
    """The analogue of the official DELTA layers for any CNN: the last convolution of each of the last
    ``num_layers`` stages.

    Stages are the modules of timm's ``model.feature_info`` if the model has it, else (torchvision and
    custom models) the last child of each run of same-resolution children of the model's trunk (see
    below). A probe forward on a zero image of ``input_size`` (default: the model's pretrained config,
    else 224 px) gives the execution order and the output shapes. In each stage the tap is the last
    convolution run inside it whose output has the stage output's spatial size, which skips
    squeeze-excitation convolutions applied to pooled vectors. If a later in-place module (e.g.
    ``ReLU(inplace=True)`` in VGG) overwrites that convolution's output, that module is tapped
    instead, since a captured tensor must not change after capture.

    This reproduces the official lists on timm's ResNet-50/101 (``feature_info`` ends with
    ``layer1``..``layer4``) and on torchvision's ResNets (trunk children ``layer1``..``layer4``). For
    timm's ``tf_efficientnet_lite0`` it gives ``blocks.{1.1,2.1,4.2,6.0}.conv_pwl``. Without
    ``feature_info``, a final 1x1 "head" convolution counts as part of the last stage (torchvision
    EfficientNet: ``features.8.0``).

    Stages without any convolution (e.g. timm's ``act1`` entry) are skipped, and the last
    ``num_layers`` of the remaining ones are used.

    Args:
        model: the model; its train/eval mode is restored after the probe.
        num_layers: how many stages to tap (the official presets use 4).
        input_size: ``(C, H, W)`` of the probe image.

    Returns:
        Module names in forward order.

    Raises:
        ValueError: no convolution was found, or a chosen convolution is modified in place by an
            operation that is not a module.
    """
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no Conv2d: pass the layers to regularize explicitly")
    records = _probe(model, input_size)
    stages = _feature_info_stages(model) or _structural_stages(model, records)
    taps = [tap for tap in (_stage_tap(records, stage) for stage in stages) if tap is not None]
    if not taps:
        raise ValueError(f"no Conv2d ran in the stages {stages} of {type(model).__name__}: "
                         "pass the layers to regularize explicitly")
    return taps[-num_layers:]
