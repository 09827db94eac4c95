"""FeatureHooks and the DELTA layer presets."""
import pytest
import timm
import torch
import torchvision
from torch import nn

from deltatl.features import OFFICIAL_PRESETS, FeatureHooks, auto_layer_preset, layer_preset

torch.set_num_threads(1)

LITE0_PRESET = ["blocks.1.1.conv_pwl", "blocks.2.1.conv_pwl", "blocks.4.2.conv_pwl", "blocks.6.0.conv_pwl"]


def small_cnn() -> nn.Sequential:
    """VGG-like: each conv is followed by an in-place ReLU, then a pooling halves the resolution."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


def tiny_timm_resnet(**kwargs) -> nn.Module:
    return timm.create_model("resnet18", pretrained=False, num_classes=3, channels=(8, 16, 32, 64),
                             stem_width=8, **kwargs)


def test_hooks_capture_the_outputs_of_the_named_modules():
    model = small_cnn()
    x = torch.randn(2, 3, 16, 16)
    with FeatureHooks(model, ["4", "8"]) as hooks:
        model(x)
        features = hooks.pop()
    assert list(features) == ["4", "8"]
    torch.testing.assert_close(features["8"], model[:9](x))
    torch.testing.assert_close(features["4"], model[:5](x))


def test_captured_features_carry_gradients_to_the_parameters():
    model = small_cnn()
    with FeatureHooks(model, ["8"]) as hooks:
        model(torch.randn(2, 3, 16, 16))
        hooks.pop()["8"].sum().backward()
    assert model[0].weight.grad is not None


def test_hooks_are_registered_once_and_stay_one_per_layer_over_many_forwards():
    model = small_cnn()
    hooks = FeatureHooks(model, ["4", "7"])
    for _ in range(5):
        model(torch.randn(1, 3, 16, 16))
        hooks.pop()
    assert hooks.num_hooks == 2
    assert len(model[4]._forward_hooks) == 1 and len(model[7]._forward_hooks) == 1
    hooks.close()
    hooks.close()
    assert hooks.num_hooks == 0
    assert len(model[4]._forward_hooks) == 0 and len(model[7]._forward_hooks) == 0


def test_leaving_the_with_block_removes_the_hooks():
    model = small_cnn()
    with FeatureHooks(model, ["3"]):
        pass
    assert len(model[3]._forward_hooks) == 0


def test_pop_clears_so_features_of_one_step_never_reach_the_next():
    model = small_cnn()
    with FeatureHooks(model, ["4"]) as hooks:
        model(torch.randn(1, 3, 16, 16))
        hooks.pop()
        with pytest.raises(RuntimeError, match="no output captured for layer"):
            hooks.pop()


def test_clear_drops_features_of_a_forward_that_did_not_need_them():
    model = small_cnn()
    with FeatureHooks(model, ["3"]) as hooks:
        model(torch.randn(1, 3, 16, 16))
        hooks.clear()
        with pytest.raises(RuntimeError, match="no output captured"):
            hooks.pop()


def test_unknown_layer_name_raises_with_close_matches_and_the_valid_names():
    model = torchvision.models.resnet18()
    with pytest.raises(ValueError) as info:
        FeatureHooks(model, ["layer1.0.conv"])
    message = str(info.value)
    assert "'layer1.0.conv' (did you mean 'layer1.0.conv2', 'layer1.0.conv1'" in message
    assert "Valid module names: 'conv1', 'bn1'" in message
    assert "more)" in message  # resnet18 has more module names than are worth printing


def test_repeated_layer_names_raise():
    with pytest.raises(ValueError, match="repeated"):
        FeatureHooks(small_cnn(), ["3", "3"])


def test_a_conv_followed_by_an_in_place_relu_is_detected():
    model = small_cnn()
    with FeatureHooks(model, ["3"]) as hooks:
        model(torch.randn(1, 3, 16, 16))
        with pytest.raises(RuntimeError, match="layer '3' was modified in place"):
            hooks.pop()


def test_in_place_mutation_after_the_hooked_module_is_detected_and_names_the_layer():
    # torchvision's BasicBlock runs `out += identity` on the output of bn2.
    model = torchvision.models.resnet18().eval()
    with FeatureHooks(model, ["layer1.0.bn2"]) as hooks:
        model(torch.randn(1, 3, 32, 32))
        with pytest.raises(RuntimeError, match=r"layer 'layer1.0.bn2' was modified in place.*hook a different"):
            hooks.pop()


def test_a_module_whose_output_is_not_mutated_passes_the_in_place_check():
    model = torchvision.models.resnet18().eval()
    with FeatureHooks(model, ["layer1.0.conv2"]) as hooks:
        model(torch.randn(1, 3, 32, 32))
        assert hooks.pop()["layer1.0.conv2"].shape == (1, 64, 8, 8)


def test_hooks_on_the_bare_model_fire_under_distributed_data_parallel(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = small_cnn()
        with FeatureHooks(model, ["4"]) as hooks:  # built before wrapping
            ddp = nn.parallel.DistributedDataParallel(model)
            ddp(torch.randn(2, 3, 16, 16)).sum().backward()
            assert hooks.pop()["4"].shape == (2, 6, 8, 8)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("name", ["resnet50", "resnet101", "inception_v3"])
def test_official_presets_are_module_names_of_the_timm_models(name):
    model = timm.create_model(name, pretrained=False, num_classes=3, device="meta")
    assert layer_preset(model, name) == list(OFFICIAL_PRESETS[name])


@pytest.mark.parametrize("name", ["resnet50", "resnet101", "inception_v3"])
def test_official_presets_are_module_names_of_the_torchvision_models(name):
    with torch.device("meta"):
        kwargs = {"init_weights": False} if name == "inception_v3" else {}
        model = getattr(torchvision.models, name)(**kwargs)
    assert layer_preset(model, f"torchvision/{name}") == list(OFFICIAL_PRESETS[name])


def test_official_resnet101_preset_taps_the_last_bottleneck_of_each_stage():
    assert OFFICIAL_PRESETS["resnet101"] == ("layer1.2.conv3", "layer2.3.conv3", "layer3.22.conv3",
                                             "layer4.2.conv3")


@pytest.mark.parametrize("model_name", ["resnet50.a1_in1k", "hf-hub:timm/resnet50.tv_in1k", "RESNET50",
                                        "tv_resnet50", "torchvision/resnet50"])
def test_pretrained_tags_and_prefixes_select_the_official_preset(model_name):
    model = timm.create_model("resnet50", pretrained=False, device="meta")
    assert layer_preset(model, model_name) == list(OFFICIAL_PRESETS["resnet50"])


def test_official_preset_raises_when_the_model_lacks_its_layers():
    with pytest.raises(ValueError, match="no module"):
        layer_preset(tiny_timm_resnet(), "resnet50")


def test_auto_preset_reproduces_the_official_resnet50_layers_for_timm():
    model = timm.create_model("resnet50", pretrained=False, num_classes=3)
    assert auto_layer_preset(model, input_size=(3, 64, 64)) == list(OFFICIAL_PRESETS["resnet50"])


def test_auto_preset_reproduces_the_official_resnet50_layers_for_torchvision_without_feature_info():
    model = torchvision.models.resnet50()
    assert not hasattr(model, "feature_info")
    assert auto_layer_preset(model, input_size=(3, 64, 64)) == list(OFFICIAL_PRESETS["resnet50"])


def test_auto_preset_of_tf_efficientnet_lite0_is_the_last_pointwise_conv_of_each_stage():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
    assert layer_preset(model, "tf_efficientnet_lite0", input_size=(3, 64, 64)) == LITE0_PRESET


def test_auto_preset_skips_squeeze_excitation_convolutions():
    # In named_modules order se.fc2 (a conv on pooled 1x1 vectors) is the block's last conv.
    model = tiny_timm_resnet(block_args={"attn_layer": "se"})
    convs = [n for n, m in model.layer1[1].named_modules() if isinstance(m, nn.Conv2d)]
    assert convs[-1] == "se.fc2"
    assert auto_layer_preset(model, input_size=(3, 64, 64)) == [
        "layer1.1.conv2", "layer2.1.conv2", "layer3.1.conv2", "layer4.1.conv2"]


def test_auto_preset_taps_the_in_place_relu_that_overwrites_the_last_conv_of_a_resolution():
    # Without feature_info: the last conv before each down-sampling; its in-place ReLU returns the
    # same tensor after modifying it, so the ReLU is the module whose output is stable.
    model = small_cnn()
    assert auto_layer_preset(model, input_size=(3, 16, 16)) == ["1", "4", "7"]
    with FeatureHooks(model, ["1", "4", "7"]) as hooks:
        model(torch.randn(1, 3, 16, 16))
        hooks.pop()


def test_auto_preset_keeps_the_model_mode_and_returns_at_most_num_layers():
    model = small_cnn().train()
    assert auto_layer_preset(model, num_layers=2, input_size=(3, 16, 16)) == ["4", "7"]
    assert all(m.training for m in model.modules())


def test_auto_preset_raises_for_a_model_without_convolutions():
    with pytest.raises(ValueError, match="no Conv2d"):
        layer_preset(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), "mlp")
