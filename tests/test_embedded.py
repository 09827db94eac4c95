"""The embedded default is real: ImageNet weights that recognise real photos, real Fashion-MNIST."""
import os

import pytest
from PIL import Image

from deltatl.cli import main
from deltatl.data import fashion_mnist
from deltatl.predict import predict_files

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    skdata = pytest.importorskip("skimage.data")
    folder = tmp_path_factory.mktemp("photos")
    paths = {}
    for name in ("chelsea", "coffee"):
        paths[name] = str(folder / f"{name}.png")
        Image.fromarray(getattr(skdata, name)()).save(paths[name])
    return paths


def test_embedded_imagenet_weights_recognise_the_cat_and_the_espresso(photos):
    (_, cat), (_, coffee) = predict_files([photos["chelsea"], photos["coffee"]], top_k=5, device="cpu")
    cat_names = " | ".join(name for name, _ in cat)
    assert any(c in cat_names for c in ("tabby", "tiger cat", "Egyptian cat")), cat_names
    assert sum(c in cat_names for c in ("tabby", "tiger cat", "Egyptian cat")) == 3, cat_names
    assert coffee[0][0] == "espresso"
    assert coffee[0][1] > 0.5


def test_predict_without_checkpoint_prints_imagenet_names(photos, capsys):
    assert main(["predict", photos["coffee"], "--top-k", "1", "--device", "cpu"]) == 0
    assert "espresso" in capsys.readouterr().out


def test_fashion_mnist_is_found_where_the_debian_package_put_it():
    splits = fashion_mnist.load(None)
    assert len(splits["train"]) == 60000 and len(splits["test"]) == 10000
    assert sorted(set(splits["test"].targets)) == list(range(10))
    img = splits["train"].load(0)
    assert img.mode == "RGB" and img.size == (28, 28)


def test_frozen_imagenet_features_beat_chance_by_far_on_real_fashion_mnist(tmp_path, capsys):
    """L2-FE for a few epochs on 30 images per class: ImageNet features must transfer (chance is 10%)."""
    out = tmp_path / "run"
    code = main(["train", "--method", "l2-fe", "--epochs", "8", "--image-size", "64", "--lr", "0.01",
                 "--test-per-class", "50", "--val-per-class", "10", "--device", "cpu", "--quiet",
                 "--out", str(out)])
    assert code == 0
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_top1"] > 50.0, summary
    assert os.path.isfile(out / "splits" / "train.txt")
