"""``deltatl export``: timm loads the fine-tuned model and its preprocessing, no deltatl needed."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_TRAIN_ARGS
from deltatl.data.transforms import evaluation_transform
from deltatl.export import class_names, load_model
from deltatl.models import preprocessing
from deltatl.predict import load_trained


@pytest.fixture
def trained(cli, image_folder, tmp_path):
    run = tmp_path / "run"
    assert cli("train", "--data", image_folder(), *TINY_TRAIN_ARGS, "--resize", "40", "--out", run).code == 0
    return run


def test_timm_loads_the_export_with_the_runs_weights_classes_and_preprocessing(cli, trained, tmp_path):
    out = tmp_path / "export"
    result = cli("export", trained, "--out", out)
    assert result.code == 0, result.err
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 3
    assert config["label_names"] == ["blue", "green", "red"]
    # a fresh interpreter, deltatl not imported: timm alone
    script = ("import json, sys, timm, torch; m = timm.create_model('local-dir:' + sys.argv[1], pretrained=True).eval();"
              "torch.manual_seed(0); x = torch.randn(2, 3, 32, 32);"
              "print(json.dumps({'logits': m(x).tolist(), 'data': timm.data.resolve_data_config(model=m)}))")
    proc = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "deltatl" not in proc.stderr
    loaded = json.loads(proc.stdout)
    model, info = load_trained(trained)
    torch.manual_seed(0)
    expected = model(torch.randn(2, 3, 32, 32))
    assert np.allclose(loaded["logits"], expected.detach().numpy(), atol=1e-5)
    # timm's transform from the export equals the run's evaluation transform on an image
    import timm.data

    timm_transform = timm.data.create_transform(**loaded["data"])
    ours = evaluation_transform(32, preprocessing(model), 40)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    assert torch.allclose(timm_transform(image), ours(image), atol=1e-6)


def test_load_model_and_predict_take_an_export_like_a_run(cli, trained, tmp_path, image_folder):
    out = tmp_path / "export"
    assert cli("export", trained, "--out", out).code == 0
    exported, from_run = load_model(str(out)), load_model(str(trained))
    assert class_names(exported) == class_names(from_run) == ["blue", "green", "red"]
    assert not exported.training and not from_run.training
    images = torch.randn(3, 3, 32, 32)
    assert torch.allclose(exported(images), from_run(images), atol=1e-5)
    image = next((image_folder("more") / "test" / "red").iterdir())
    by_run = cli("predict", image, "--checkpoint", trained, "--top-k", "3").out
    by_export = cli("predict", image, "--checkpoint", out, "--top-k", "3").out
    assert by_run == by_export and "red" in by_run


def test_export_refuses_a_folder_of_other_files_and_a_missing_run(cli, trained, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    result = cli("export", trained, "--out", busy)
    assert result.code == 2 and "did not write (notes.txt)" in result.err
    assert cli("export", tmp_path / "nowhere", "--out", tmp_path / "e").code == 2


def test_the_onnx_export_gives_pytorchs_logits_in_onnxruntime(cli, trained, tmp_path):
    import onnxruntime

    out = tmp_path / "export"
    result = cli("export", trained, "--out", out, "--format", "onnx")
    assert result.code == 0, result.err
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    model, _ = load_trained(trained)
    for batch in (1, 5):  # a dynamic batch
        images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        [logits] = session.run(["logits"], {"images": images.numpy()})
        assert np.allclose(logits, model(images).detach().numpy(), atol=1e-5)
