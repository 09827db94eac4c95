"""Inception-V3's auxiliary classifier: removed by default, or kept with a new head and a weighted loss.

Also: source checkpoints whose classifier has another number of classes (Places365) or carries
auxiliary weights the model does not have. Inception-V3 runs with random weights (``--pretrained
none``) on 2-image batches; the aux head needs 299-pixel inputs, the plain network runs at 75.
"""
from __future__ import annotations

import json
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from deltatl.config import TrainConfig
from deltatl.engine.objective import Objective
from deltatl.errors import DeltatlError
from deltatl.models import aux_head_name, create_model, head_module, split_parameters


@pytest.fixture(scope="module")
def with_aux() -> nn.Module:
    torch.manual_seed(0)
    return create_model("inception_v3", 3, pretrained="none", aux_head=True)


@pytest.mark.parametrize("name", ["inception_v3", "torchvision/inception_v3"])
def test_by_default_the_aux_head_is_removed_and_the_model_returns_logits(name):
    model = create_model(name, 3, pretrained="none").train()
    assert model.AuxLogits is None and aux_head_name(model) is None
    assert not any(k.startswith("AuxLogits.") for k in model.state_dict())
    out = model(torch.randn(2, 3, 75, 75))  # the main path runs from 75 pixels; the aux head needs 299
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)


def test_a_kept_aux_head_gives_aux_logits_in_training_mode_only(with_aux):
    x = torch.randn(2, 3, 299, 299)
    with torch.no_grad():
        logits, aux = with_aux.train()(x)
        assert logits.shape == aux.shape == (2, 3)
        evaluated = with_aux.eval()(x)
    assert isinstance(evaluated, torch.Tensor) and evaluated.shape == (2, 3)


def test_the_kept_aux_head_has_a_new_last_layer_that_counts_as_private(with_aux):
    assert aux_head_name(with_aux) == "AuxLogits.fc"
    assert with_aux.AuxLogits.fc.out_features == 3
    shared, private = split_parameters(with_aux)
    assert sorted(n for n, _ in private) == ["AuxLogits.fc.bias", "AuxLogits.fc.weight", "fc.bias", "fc.weight"]
    assert any(n.startswith("AuxLogits.conv") for n, _ in shared)  # the aux convolutions come from the source
    assert head_module(with_aux) is with_aux.fc


def test_torchvision_inception_keeps_its_aux_head_the_same_way():
    model = create_model("torchvision/inception_v3", 4, pretrained="none", aux_head=True)
    with torch.no_grad():
        out = model.train()(torch.randn(2, 3, 299, 299))
        assert isinstance(out, tuple) and out[1].shape == (2, 4)
        assert isinstance(model.eval()(torch.randn(2, 3, 299, 299)), torch.Tensor)
    assert aux_head_name(model) == "AuxLogits.fc"


def test_the_objective_adds_the_weighted_aux_cross_entropy(with_aux):
    torch.manual_seed(1)
    x, labels = torch.randn(2, 3, 299, 299), torch.tensor([0, 2])
    objective = Objective(with_aux, "l2", aux_weight=0.4).train()
    out = objective(x, labels)
    with torch.no_grad():
        torch.manual_seed(1)
        logits, aux = with_aux.train()(x)  # BatchNorm in train mode: a second pass matches
    assert out["ce"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-4)
    assert out["aux/ce"] == pytest.approx(0.4 * F.cross_entropy(aux, labels).item(), rel=1e-4)
    assert out["loss"].item() == pytest.approx((out["ce"] + out["aux/ce"]).item(), rel=1e-6)
    objective.eval()
    assert "aux/ce" not in objective(x, labels)


def test_the_aux_weight_on_a_model_without_aux_head_is_an_error():
    with pytest.raises(DeltatlError, match="does not support `aux_weight`"):
        create_model("test_resnet", 3, pretrained="none", aux_head=True)
    with pytest.raises(DeltatlError, match="no auxiliary classifier"):
        create_model("torchvision/resnet18", 3, pretrained="none", aux_head=True)
    with pytest.raises(DeltatlError, match="299"):
        TrainConfig(aux_weight=0.4, image_size=224)


# --- source checkpoints -----------------------------------------------------------------------------------


def test_a_source_checkpoint_with_aux_weights_loads_into_the_model_without_aux_head(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("inception_v3", aux_logits=True)  # like torchvision's ImageNet file
    path = tmp_path / "inception.pth"
    torch.save(source.state_dict(), path)
    model = create_model("inception_v3", 5, checkpoint=str(path))
    assert model.AuxLogits is None
    assert torch.equal(model.Mixed_7c.branch1x1.conv.weight, source.Mixed_7c.branch1x1.conv.weight)
    kept = create_model("inception_v3", 5, checkpoint=str(path), aux_head=True)
    assert torch.equal(kept.AuxLogits.conv1.conv.weight, source.AuxLogits.conv1.conv.weight)
    assert kept.AuxLogits.fc.out_features == 5


def test_a_source_checkpoint_without_aux_weights_keeps_a_fresh_aux_head_with_a_warning(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "inception-noaux.pth"
    torch.save(timm.create_model("inception_v3").state_dict(), path)
    with pytest.warns(UserWarning, match="no auxiliary-classifier weights"):
        model = create_model("inception_v3", 5, checkpoint=str(path), aux_head=True)
    assert model.AuxLogits is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_model("inception_v3", 5, checkpoint=str(path))  # no aux wanted: nothing to warn about


def test_a_source_classifier_with_another_number_of_classes_loads_like_places365(tmp_path):
    torch.manual_seed(0)
    places = timm.create_model("test_resnet", num_classes=365)
    path = tmp_path / "places365.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in places.state_dict().items()}}, path)
    model = create_model("test_resnet", 67, checkpoint=str(path))
    assert model.fc.out_features == 67
    assert torch.equal(model.conv1[0].weight, places.conv1[0].weight)


# --- end to end -------------------------------------------------------------------------------------------


INCEPTION_ARGS = ["--model", "inception_v3", "--pretrained", "none", "--batch-size", "2", "--iters", "2",
                  "--device", "cpu", "--quiet", "--val-per-class", "0"]


def test_inception_with_its_aux_head_trains_and_evaluates_end_to_end(cli, image_folder, tmp_path):
    data = image_folder(classes=("red", "green"), train=2, test=1)
    run = tmp_path / "aux"
    result = cli("train", "--data", data, *INCEPTION_ARGS, "--image-size", "299", "--resize", "299",
                 "--aux-weight", "0.4", "--method", "l2-sp", "--out", run)
    assert result.code == 0, result.err
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["model"]["AuxLogits.fc.weight"].shape == (2, 768)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("train/aux/ce" in row for row in rows)
    evaluated = cli("eval", run, "--device", "cpu", "--quiet")  # rebuilds the model with its aux head
    assert evaluated.code == 0, evaluated.err


def test_inception_without_aux_head_runs_delta_at_a_small_size(cli, image_folder, tmp_path):
    data = image_folder(classes=("red", "green"), train=2, test=1)
    result = cli("train", "--data", data, *INCEPTION_ARGS, "--image-size", "75", "--method", "delta",
                 "--attention-epochs", "1", "--attention-batches", "1", "--attention-batch-size", "2",
                 "--attention-method", "first_order",  # the exact scores of 1312 channels take half a minute
                 "--attention-cache", tmp_path / "cache", "--out", tmp_path / "delta")
    assert result.code == 0, result.err
    layers = json.loads((tmp_path / "delta" / "attention.json").read_text())["layers"]
    assert list(layers) == ["Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e"]
