"""A fine-tuned model outside deltatl: timm's own Hugging Face folder layout, and loading it back.

``deltatl export RUN --out DIR`` writes ``DIR/config.json`` and the weights with timm's
``save_for_hf``: the architecture, ``num_classes``, ``label_names`` (the run's class names) and a
``pretrained_cfg`` holding the run's evaluation preprocessing (input size, resize and crop, mean, std,
interpolation), so that::

    model = timm.create_model("local-dir:DIR", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))

is the fine-tuned model with its preprocessing, no deltatl needed (images converted to RGB first).
"""
from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from .data.transforms import default_resize
from .errors import DeltatlError
from .models import TORCHVISION_PREFIX, preprocessing
from .outputs import check_output_folder

EXPORT_FILES = ("config.json", "pytorch_model.bin", "model.safetensors", "model.onnx", "*.tmp")


def data_config(config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """timm's preprocessing keys for a run's evaluation transform: resize to ``resize`` (a square, or
    the shorter edge with ``keep_aspect``: timm's ``squash`` / ``center`` crop modes), centre crop to
    ``image_size``, normalise."""
    size = int(config["image_size"])
    resize = config.get("resize") or default_resize(size)
    pre = preprocessing(model)
    return {"input_size": (3, size, size), "crop_pct": size / resize,
            "crop_mode": "center" if config.get("keep_aspect") else "squash",
            "mean": tuple(pre.mean), "std": tuple(pre.std), "interpolation": pre.interpolation}


def export_run(run: str, out: str, onnx: bool = False) -> str:
    """Write the run's model (a directory or its ``checkpoint.pt``) into ``out`` in timm's layout; with
    ``onnx`` also ``model.onnx`` (input ``images``: a batch of any size of preprocessed images, output
    ``logits``)."""
    from timm.models import save_for_hf

    from .predict import load_trained

    model, info = load_trained(run)
    config = info["config"]
    if str(config["model"]).startswith(TORCHVISION_PREFIX):
        raise DeltatlError(f"{run} is a torchvision model; timm's layout holds timm models only")
    check_output_folder(out, "export", EXPORT_FILES)
    save_for_hf(model, out, model_config={"label_names": list(info["classes"])},
                data_config=data_config(config, model), safe_serialization=True)
    with open(os.path.join(out, "config.json")) as f:
        json.load(f)  # written by timm: make sure it is whole before saying so
    if onnx:
        export_onnx(model, int(config["image_size"]), os.path.join(out, "model.onnx"))
    return out


def export_onnx(model: nn.Module, image_size: int, path: str) -> None:
    """``model`` (eval mode) as ONNX with a dynamic batch (PyTorch's torch.export-based exporter, which
    needs onnxscript: the ``onnx`` extra), written to a temporary name and renamed."""
    import torch

    example = torch.zeros(1, 3, image_size, image_size)
    program = torch.onnx.export(model.eval(), (example,), input_names=["images"], output_names=["logits"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        program.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def is_export(path: str) -> bool:
    """Whether ``path`` is a ``deltatl export`` folder (timm's layout) rather than a run."""
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, "checkpoint.pt"))


def load_model(path: str) -> nn.Module:
    """A fine-tuned model in eval mode, from a run (directory or ``checkpoint.pt``) or an export folder;
    its class names are ``class_names(model)`` (timm's ``pretrained_cfg["label_names"]``)."""
    if is_export(path):
        import timm

        return timm.create_model(f"local-dir:{os.path.abspath(path)}", pretrained=True).eval()
    from .predict import load_trained

    model, info = load_trained(path)
    model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "label_names": list(info["classes"])}
    return model


def class_names(model: nn.Module) -> list[str]:
    """The class names of a model from :func:`load_model` (index -> name)."""
    return list((getattr(model, "pretrained_cfg", None) or {}).get("label_names") or [])
