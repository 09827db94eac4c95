"""DELTA channel attention: normalisation, files, and the three ways to compute the raw scores."""
import json
import math
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from deltatl.attention.scores import (FORMAT, _expansion_point, channel_attention_scores, normalize_scores,
                               read_scores, write_scores)
from deltatl.attention.replay import call_order, plan_replay
from deltatl.features import layer_preset

torch.set_num_threads(1)

RESNET_LAYERS = ["layer1.1.conv2", "layer2.1.conv2", "layer3.1.conv2", "layer4.1.conv2"]


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """timm zero-initialises the last BN of each residual branch, which would make every score 0."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    return model


def tiny_resnet(seed: int = 0, num_classes: int = 5) -> nn.Module:
    """timm's resnet18 (BasicBlocks with residual connections) at 1/8 of the width."""
    torch.manual_seed(seed)
    model = timm.create_model("resnet18", pretrained=False, num_classes=num_classes,
                              channels=(8, 16, 32, 64), stem_width=8)
    return randomize_batchnorm(model).eval()


def random_batches(count: int, batch: int, size: int = 32, classes: int = 5, seed: int = 1) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=generator),
             torch.randint(0, classes, (batch,), generator=generator)) for _ in range(count)]


def scores(model, layers, batches, **kwargs):
    return channel_attention_scores(model, layers, batches, progress=False, **kwargs)


# --- normalize_scores -------------------------------------------------------------------------

def test_normalize_scores_is_a_population_z_score_then_softmax_over_temperature():
    # mean 2.5, population variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    z = [(d - 2.5) / math.sqrt(1.25) for d in (1.0, 2.0, 3.0, 4.0)]
    exp = [math.exp(v / 5) for v in z]
    expected = torch.tensor([e / sum(exp) for e in exp])
    weights = normalize_scores({"l": [1.0, 2.0, 3.0, 4.0]})["l"]
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, expected)
    assert abs(weights.sum().item() - 1) < 1e-6


def test_normalize_scores_uses_the_temperature():
    z = [(d - 2.5) / math.sqrt(1.25) for d in (1.0, 2.0, 3.0, 4.0)]
    exp = [math.exp(v / 0.5) for v in z]
    weights = normalize_scores({"l": torch.tensor([1.0, 2.0, 3.0, 4.0])}, temperature=0.5)["l"]
    torch.testing.assert_close(weights, torch.tensor([e / sum(exp) for e in exp]))


def test_equal_scores_give_uniform_weights():
    weights = normalize_scores({"same": [0.1] * 7, "one": [3.0]})
    torch.testing.assert_close(weights["same"], torch.full((7,), 1 / 7))
    assert weights["one"].tolist() == [1.0]


def test_normalized_weights_sum_to_one_for_every_layer():
    raw = {"a": torch.randn(256) * 1e-3, "b": torch.randn(2048)}
    for weights in normalize_scores(raw).values():
        assert abs(weights.sum().item() - 1) < 1e-5 and (weights > 0).all()


def test_normalize_scores_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        normalize_scores({"l": [1.0, 2.0]}, temperature=0)
    with pytest.raises(ValueError, match="NaN"):
        normalize_scores({"l": [1.0, float("nan")]})
    with pytest.raises(ValueError, match="non-empty 1-D"):
        normalize_scores({"l": torch.ones(2, 2)})


# --- files ------------------------------------------------------------------------------------

def test_written_scores_read_back_exactly_with_their_meta(tmp_path):
    path = tmp_path / "attention.json"
    raw = {"layer1.2.conv3": torch.randn(256), "layer4.2.conv3": torch.randn(2048)}
    write_scores(path, raw, meta={"model": "resnet50", "batches": 4})
    assert os.listdir(tmp_path) == ["attention.json"]  # no temporary file left behind
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT and doc["meta"] == {"model": "resnet50", "batches": 4}
    loaded = read_scores(path, layers=list(raw), channels={"layer1.2.conv3": 256})
    assert list(loaded) == list(raw)
    for name in raw:
        assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name], raw[name])


def test_layers_of_a_deltatl_file_are_returned_in_the_requested_order(tmp_path):
    path = tmp_path / "a.json"
    write_scores(path, {"a": [1.0], "b": [2.0]})
    assert list(read_scores(path, layers=["b", "a"])) == ["b", "a"]


def test_a_deltatl_file_for_other_layers_is_rejected(tmp_path):
    path = tmp_path / "a.json"
    write_scores(path, {"a": [1.0], "b": [2.0]})
    with pytest.raises(ValueError, match=r"a.json: layers differ .*missing \['c'\], extra \['b'\]"):
        read_scores(path, layers=["a", "c"])


def test_an_official_list_file_maps_its_entries_in_order_onto_the_layers(tmp_path):
    path = tmp_path / "official.json"
    path.write_text(json.dumps([[0.1, 0.2], [0.3, 0.4, 0.5]]))
    loaded = read_scores(path, layers=["first", "second"], channels={"first": 2, "second": 3})
    assert list(loaded) == ["first", "second"]
    torch.testing.assert_close(loaded["second"], torch.tensor([0.3, 0.4, 0.5]))


def test_an_official_list_file_needs_the_layer_names_and_their_count(tmp_path):
    path = tmp_path / "official.json"
    path.write_text(json.dumps([[0.1, 0.2], [0.3, 0.4, 0.5]]))
    with pytest.raises(ValueError, match="has no layer names: pass layers"):
        read_scores(path)
    with pytest.raises(ValueError, match=r"2 layer entries, expected 3"):
        read_scores(path, layers=["a", "b", "c"])


def test_a_channel_count_mismatch_names_the_file_the_layer_and_both_counts(tmp_path):
    path = tmp_path / "official.json"
    path.write_text(json.dumps([[0.1, 0.2], [0.3, 0.4, 0.5]]))
    with pytest.raises(ValueError) as info:
        read_scores(path, layers=["first", "second"], channels={"second": 4})
    assert str(info.value) == f"{path}: layer 'second': expected 4 channels, found 3"


def test_malformed_files_are_rejected_with_the_file_name(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a JSON file"):
        read_scores(path)
    path.write_text(json.dumps({"format": "other", "layers": {}}))
    with pytest.raises(ValueError, match="unknown attention file format 'other'"):
        read_scores(path)
    path.write_text(json.dumps([["x"]]))
    with pytest.raises(ValueError, match="layer 'a': expected a non-empty list of numbers"):
        read_scores(path, layers=["a"])


def test_writing_non_finite_scores_is_refused(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        write_scores(tmp_path / "a.json", {"a": [float("inf")]})
    assert os.listdir(tmp_path) == []


# --- raw scores -------------------------------------------------------------------------------

def filter_zeroing_scores(model, layer, batches, channels):
    """The official procedure, independently: zero conv filter j (bias-free), loss difference."""
    conv = dict(model.named_modules())[layer]
    assert conv.bias is None
    result = torch.zeros(len(channels), dtype=torch.float64)
    with torch.no_grad():
        for images, labels in batches:
            loss0 = F.cross_entropy(model(images), labels).double()
            for i, j in enumerate(channels):
                saved = conv.weight[j].clone()
                conv.weight[j] = 0
                result[i] += F.cross_entropy(model(images), labels).double() - loss0
                conv.weight[j] = saved
    return (result / len(batches)).float()


def test_naive_scores_equal_the_official_filter_zeroing():
    model = tiny_resnet()
    batches = random_batches(2, 2)
    naive = scores(model, ["layer2.1.conv2"], batches, method="naive")["layer2.1.conv2"]
    reference = filter_zeroing_scores(model, "layer2.1.conv2", batches, range(16))
    torch.testing.assert_close(naive, reference, rtol=0, atol=1e-6)
    assert naive.abs().max() > 1e-3  # the test is not comparing zeros


@pytest.mark.parametrize("batch", [1, 2])
def test_exact_scores_equal_naive_scores_on_a_residual_network(batch):
    model = tiny_resnet()
    layers = layer_preset(model, "resnet18", input_size=(3, 32, 32))
    assert layers == RESNET_LAYERS
    batches = random_batches(2, batch)
    # 5 masks per forward: several chunks per layer and a shorter last one.
    exact = scores(model, layers, batches, masks_per_forward=5)
    naive = scores(model, layers, batches, method="naive")
    for name in layers:
        assert exact[name].shape == naive[name].shape == (model.get_submodule(name).out_channels,)
        torch.testing.assert_close(exact[name], naive[name], rtol=0, atol=1e-5)
        assert naive[name].abs().max() > 1e-3


def test_exact_scores_equal_naive_scores_for_outputs_around_the_residual_add():
    # layer2: a stage output (after the add); layer3.0.bn2: its output is later modified by `x += shortcut`.
    model = tiny_resnet()
    batches = random_batches(1, 3)
    exact = scores(model, ["layer2", "layer3.0.bn2"], batches, masks_per_forward=64)
    naive = scores(model, ["layer2", "layer3.0.bn2"], batches, method="naive")
    for name in exact:
        torch.testing.assert_close(exact[name], naive[name], rtol=0, atol=1e-5)


def test_exact_replicates_the_residual_block_input_when_the_shortcut_needs_it():
    model = tiny_resnet()
    images, labels = random_batches(1, 2)[0]
    with torch.no_grad():
        loss0 = F.cross_entropy(model(images), labels).double().reshape(1)
        assert _expansion_point(model, "layer1.1.conv2", images, labels, loss0) is model.layer1[1]
        assert _expansion_point(model, "layer1.1", images, labels, loss0) is None


@pytest.mark.parametrize("layers", [RESNET_LAYERS, ["layer2", "layer3.0.bn2"]])
def test_exact_scores_with_one_channel_per_forward_replay_the_prefix_and_still_equal_naive(layers):
    """Groups of one (a 1-byte replica budget): every group forward replays the part before the
    replication point, including outputs that are modified in place later (``layer3.0.bn2``)."""
    model = tiny_resnet()
    batches = random_batches(2, 2)
    exact = scores(model, layers, batches, replica_budget_bytes=1)
    naive = scores(model, layers, batches, method="naive")
    for name in layers:
        torch.testing.assert_close(exact[name], naive[name], rtol=0, atol=1e-5)


def test_a_module_called_several_times_per_forward_is_never_replayed():
    """torchvision's ResNet calls one ReLU module three times per block: replaying it would hand its
    first output to the later calls."""
    import torchvision

    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=5)).eval()
    images, _ = random_batches(1, 2)[0]
    plan = plan_replay(call_order(model, images), "layer2.1", at_exit=False)
    assert "layer1" in plan.modules and "layer2.0" in plan.modules and "layer2.1.relu" not in plan.modules
    batches = random_batches(1, 2)
    exact = scores(model, ["layer2.1.conv1"], batches, replica_budget_bytes=1)
    naive = scores(model, ["layer2.1.conv1"], batches, method="naive")
    torch.testing.assert_close(exact["layer2.1.conv1"], naive["layer2.1.conv1"], rtol=0, atol=1e-5)


def test_the_part_before_the_replication_point_is_computed_once_per_batch_not_once_per_group():
    model = tiny_resnet()
    computed = [0]

    def counting_forward(x):
        computed[0] += 1
        return nn.Conv2d.forward(model.conv1, x)

    model.conv1.forward = counting_forward  # the stem's first convolution, before every scored layer
    scores(model, ["layer4.1.conv2"], random_batches(1, 2), replica_budget_bytes=1)  # 64 groups of one
    # the plain forward, the call order, the search for the replication point (up to 6), the recording
    assert computed[0] <= 10, computed[0]


def test_exact_scores_equal_filter_zeroing_on_tf_efficientnet_lite0_for_all_preset_layers():
    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=5)).eval()
    layers = layer_preset(model, "tf_efficientnet_lite0", input_size=(3, 32, 32))
    batches = random_batches(1, 2)
    exact = scores(model, layers, batches)
    for name in layers:
        channels = exact[name].shape[0]
        sample = [0, 1, channels // 2, channels - 1]
        reference = filter_zeroing_scores(model, name, batches, sample)
        torch.testing.assert_close(exact[name][sample], reference, rtol=0, atol=1e-5)
        assert reference.abs().max() > 1e-4


def test_scores_are_the_unweighted_mean_over_batches():
    model = tiny_resnet()
    first, second = random_batches(2, 2)
    both = scores(model, ["layer3.1.conv2"], [first, second])["layer3.1.conv2"]
    one = scores(model, ["layer3.1.conv2"], [first])["layer3.1.conv2"]
    two = scores(model, ["layer3.1.conv2"], [second])["layer3.1.conv2"]
    torch.testing.assert_close(both, (one + two) / 2)


@pytest.mark.parametrize("method", ["exact", "naive", "first_order"])
def test_scoring_runs_in_eval_mode_restores_the_mode_and_leaves_no_gradients(method):
    model = tiny_resnet().train()
    running_mean = model.layer1[0].bn1.running_mean.clone()
    scores(model, ["layer4.1.conv2"], random_batches(1, 2), method=method)
    assert all(m.training for m in model.modules())
    assert torch.equal(model.layer1[0].bn1.running_mean, running_mean)  # eval: no statistics update
    assert all(p.grad is None for p in model.parameters())


def test_first_order_scores_are_minus_activation_times_gradient():
    model = tiny_resnet()
    images, labels = random_batches(1, 3)[0]
    captured = {}
    handle = model.layer3[1].conv2.register_forward_hook(lambda m, a, out: captured.setdefault("a", out))
    loss = F.cross_entropy(model(images), labels)
    handle.remove()
    grad, = torch.autograd.grad(loss, captured["a"])
    expected = -(captured["a"] * grad).sum(dim=(0, 2, 3)).detach()
    model.zero_grad(set_to_none=True)
    first_order = scores(model, ["layer3.1.conv2"], [(images, labels)], method="first_order")
    torch.testing.assert_close(first_order["layer3.1.conv2"], expected)


def test_first_order_scores_refuse_an_output_modified_in_place_later():
    with pytest.raises(RuntimeError, match="'layer3.0.bn2' was modified in place"):
        scores(tiny_resnet(), ["layer3.0.bn2"], random_batches(1, 2), method="first_order")


def test_first_order_scores_match_exact_scores_when_zeroing_is_a_small_change():
    # Channels of tiny magnitude: the loss change is first order in them, the Taylor error second order.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight.mul_(1e-3)
        model[0].bias.zero_()
    batches = random_batches(2, 4, size=8, classes=4)
    exact = scores(model, ["0"], batches)["0"]
    first_order = scores(model, ["0"], batches, method="first_order")["0"]
    assert exact.abs().max() > 0
    torch.testing.assert_close(first_order, exact, rtol=0, atol=1e-2 * exact.abs().max().item())


def test_first_order_scores_rank_channels_like_exact_scores_on_a_trained_network():
    # Not a small change in general: only the ranking is expected to agree, roughly
    # (Spearman 0.6-0.97 per layer over seeds 0-4 of this setup).
    model = tiny_resnet(num_classes=4).train()
    prototypes = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def batch(n):
        labels = torch.randint(0, 4, (n,))
        return prototypes[labels] + 0.5 * torch.randn(n, 3, 32, 32), labels

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(30):
        images, labels = batch(16)
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    batches = [batch(8) for _ in range(2)]
    exact = scores(model, RESNET_LAYERS, batches)
    first_order = scores(model, RESNET_LAYERS, batches, method="first_order")
    for name in RESNET_LAYERS:
        assert spearmanr(exact[name], first_order[name]).statistic > 0.3, name


def test_bad_arguments_raise():
    model = tiny_resnet()
    batches = random_batches(1, 2)
    with pytest.raises(ValueError, match="method must be one of"):
        scores(model, RESNET_LAYERS, batches, method="taylor")
    with pytest.raises(ValueError, match="masks_per_forward"):
        scores(model, RESNET_LAYERS, batches, masks_per_forward=0)
    with pytest.raises(ValueError, match="unknown layer name"):
        scores(model, ["layer9"], batches)
    with pytest.raises(ValueError, match="no batches"):
        scores(model, RESNET_LAYERS, [])


def test_a_replay_that_does_not_reproduce_the_plain_forward_is_not_used():
    """A model that changes one module's output in place through another's view: replayed copies would
    break that link, so the check against the plain forward turns the replay off (still exact)."""
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x, shortcut):
            return self.conv(x) + shortcut

    class Aliasing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.view, self.block = nn.Conv2d(3, 4, 3, padding=1), nn.Identity(), Residual()
            self.head = nn.Linear(4, 5)

        def forward(self, x):
            shortcut = self.stem(x)
            alias = self.view(shortcut)  # the same tensor
            alias.mul_(2)  # so the shortcut is doubled too
            return self.head(self.block(alias, shortcut).mean((2, 3)))

    torch.manual_seed(0)
    model = Aliasing().eval()
    batches = random_batches(1, 2, size=8)
    exact = scores(model, ["block.conv"], batches, replica_budget_bytes=1)
    naive = scores(model, ["block.conv"], batches, method="naive")
    torch.testing.assert_close(exact["block.conv"], naive["block.conv"], rtol=0, atol=1e-5)
