"""Using trained (or ImageNet) models: evaluate a run's checkpoint, predict classes of image files."""
from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from .config import make_config
from .data import DATASETS, TransformedImages
from .data.images import to_rgb
from .data.transforms import evaluation_transform
from .engine import checkpoint as ckpt
from .engine.evaluate import crop_logits, evaluate
from .engine.fit import CHECKPOINT
from .errors import DeltatlError
from .export import class_names, is_export, load_model
from .models import create_model, load_state_dict_strict, preprocessing
from .run import open_splits, resolve_device


def load_trained(path: str) -> tuple[nn.Module, dict[str, Any]]:
    """The target network of a run (directory or checkpoint file) and the run's info."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    if not os.path.isfile(path):
        raise DeltatlError(f"no checkpoint at {path}")
    state = ckpt.load(path)
    if not isinstance(state, dict) or "model" not in state or "run_info" not in state:
        raise DeltatlError(f"{path} is not a deltatl run checkpoint")
    info = state["run_info"]
    if not state.get("done", True):  # a model in the middle of its training: say so, it may be far from final
        of = f" of {state['total_steps']}" if state.get("total_steps") else ""
        warnings.warn(f"{path} is an unfinished run's checkpoint, from step {state.get('step')}{of}", stacklevel=2)
    config = info["config"]
    # a kept Inception aux head is part of the trained weights (a setting absent from older runs: 0)
    model = create_model(config["model"], len(info["classes"]), pretrained="none",
                         aux_head=bool(config.get("aux_weight")))
    load_state_dict_strict(model, state["model"], f"checkpoint {path}")
    return model.eval(), info


def evaluate_checkpoint(path: str, *, split: str = "test", data_root: str | None = None, device: str = "auto",
                        progress: bool = True) -> dict[str, float]:
    model, info = load_trained(path)
    values = dict(info["config"])
    if values["data"] not in DATASETS:  # an image folder: --data-root is where it is now
        if data_root:
            values["data"] = data_root
        elif not os.path.isdir(values["data"]):
            raise DeltatlError(f"the run's image folder {values['data']} is not there any more; "
                               f"give its new place with `data_root`")
    elif data_root:
        values["data_root"] = data_root
    config = make_config({}, values)
    splits = open_splits(config)
    dataset = TransformedImages(getattr(splits, split),
                                evaluation_transform(config.image_size, preprocessing(model), config.resize,
                                                     config.keep_aspect, config.ten_crop))
    dev = resolve_device(device)
    return evaluate(model.to(dev), dataset, batch_size=config.batch_size, device=dev, progress=progress)


def _imagenet_names() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


@torch.inference_mode()
def predict_files(paths: Sequence[str], *, checkpoint: str | None = None, top_k: int = 5,
                  device: str = "auto") -> list[tuple[str, list[tuple[str, float]]]]:
    """``[(path, [(class name, probability), ...]), ...]`` for each image file. ``checkpoint``: a run
    (directory or ``checkpoint.pt``) or a ``deltatl export`` folder; None: the embedded ImageNet model."""
    if checkpoint and is_export(checkpoint):
        import timm.data

        model = load_model(checkpoint)
        names = class_names(model)
        transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    else:
        if checkpoint:
            model, info = load_trained(checkpoint)
            names, image_size, resize = info["classes"], info["config"]["image_size"], info["config"]["resize"]
            keep_aspect, ten_crop = info["config"].get("keep_aspect", False), info["config"].get("ten_crop", False)
        else:
            model, names, image_size, resize = create_model(num_classes=None).eval(), _imagenet_names(), 224, 256
            keep_aspect = ten_crop = False
        transform = evaluation_transform(image_size, preprocessing(model), resize, keep_aspect, ten_crop)
    dev = resolve_device(device)
    model.to(dev)
    results = []
    for path in paths:
        try:
            with Image.open(path) as img:
                x = transform(to_rgb(img)).unsqueeze(0).to(dev)
        except (OSError, ValueError) as exc:
            hint = f" (a run? give it as `checkpoint` {path})" if os.path.isfile(os.path.join(path, CHECKPOINT)) else ""
            raise DeltatlError(f"cannot read image {path}: {exc}{hint}") from None
        probs = (crop_logits(model, x) if x.dim() == 5 else model(x)).softmax(dim=1)[0]
        top = probs.topk(min(top_k, len(names)))
        results.append((path, [(names[i], p) for p, i in zip(top.values.tolist(), top.indices.tolist())]))
    return results
