"""Every method through ``Objective`` on a tiny timm network: the terms, their gradients, the frozen
source network, its hooks, the frozen feature extractor and the regularizer state of checkpoints."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltatl.engine.objective import METHODS, Objective
from deltatl.methods import get_method
from deltatl.errors import DeltatlError
from deltatl.features import FeatureHooks, layer_preset
from deltatl.models import create_model, split_parameters
from deltatl.regularizers import delta_distance

MODEL = "test_resnet"
NUM_CLASSES = 3


def tiny_model(seed: int = 0) -> nn.Module:
    """test_resnet with random weights (the 'pretrained' source) and a new 3-class head."""
    torch.manual_seed(seed)
    model = create_model(MODEL, NUM_CLASSES, pretrained="none")
    with torch.no_grad():  # timm zero-initialises the last BN of each residual branch
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def batch(seed: int = 1, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(size, 3, 32, 32, generator=generator),
            torch.randint(0, NUM_CLASSES, (size,), generator=generator))


def layers_of(model: nn.Module) -> list[str]:
    return layer_preset(model, MODEL)


def uniform_weights(model: nn.Module, layers) -> dict[str, torch.Tensor]:
    with FeatureHooks(model, layers) as hooks, torch.no_grad():
        model.eval()(batch()[0])
        channels = {name: f.shape[1] for name, f in hooks.pop().items()}
    model.train()
    return {name: torch.full((c,), 1.0 / c) for name, c in channels.items()}


def peaked_weights(model: nn.Module, layers) -> dict[str, torch.Tensor]:
    """Weights summing to 1 that favour the first channels strongly."""
    weights = {}
    for name, uniform in uniform_weights(model, layers).items():
        w = torch.linspace(10.0, 0.1, len(uniform))
        weights[name] = w / w.sum()
    return weights


def make_objective(method: str, seed: int = 0, **kwargs) -> Objective:
    model = tiny_model(seed)
    if get_method(method).feature_maps:
        kwargs.setdefault("layers", layers_of(model))
    if get_method(method).attention:
        kwargs.setdefault("channel_weights", peaked_weights(model, kwargs["layers"]))
    if get_method(method).has("lwf") or get_method(method).has("co-tuning"):  # the pretrained network, own classifier
        torch.manual_seed(seed)
        kwargs.setdefault("source_model", create_model(MODEL, None, pretrained="none"))
    if get_method(method).has("co-tuning"):
        kwargs.setdefault("term_options", {"relationship": torch.full((NUM_CLASSES, 1000), 1e-3)})
    return Objective(model, method, **kwargs)


def perturb_backbone(model: nn.Module, scale: float = 0.05, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    shared, _ = split_parameters(model)
    with torch.no_grad():
        for _, param in shared:
            param.add_(scale * torch.randn(param.shape, generator=generator))


def grads(objective: Objective, images, labels) -> dict[str, torch.Tensor]:
    objective.zero_grad(set_to_none=True)
    objective(images, labels)["loss"].backward()
    return {n: p.grad.clone() for n, p in objective.model.named_parameters() if p.grad is not None}


def forward_hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in module.modules())


# --- L2-SP ----------------------------------------------------------------------------------------

def test_l2sp_term_is_exactly_zero_at_the_starting_point():
    objective = make_objective("l2-sp").train()
    out = objective(*batch())
    assert out["reg/l2sp"].item() == 0.0
    assert out["ce"] > 0


def test_l2sp_gradient_is_alpha_times_the_distance_from_the_start_for_every_shared_parameter():
    alpha = 0.3
    objective = make_objective("l2-sp", alpha=alpha).train()
    start = {n: p.detach().clone() for n, p in objective.model.named_parameters()}
    perturb_backbone(objective.model)
    images, labels = batch()
    with_term = grads(objective, images, labels)
    objective.alpha = 0.0
    without_term = grads(objective, images, labels)

    shared, private = split_parameters(objective.model)
    batchnorm_params = {f"{m}.{p}" for m, mod in objective.model.named_modules()
                        if isinstance(mod, nn.BatchNorm2d) for p in ("weight", "bias")}
    assert batchnorm_params and batchnorm_params <= {n for n, _ in shared}
    for name, param in shared:
        expected = alpha * (param.detach() - start[name])
        torch.testing.assert_close(with_term[name] - without_term[name], expected, atol=1e-6, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")
    for name, _ in private:  # the new head has no starting point
        assert torch.equal(with_term[name], without_term[name]), name
    assert set(objective.l2sp.names) == {n for n, _ in shared}


def test_head_term_is_beta_times_half_the_squared_norm_of_head_weight_and_bias():
    beta = 0.2
    for method in ("l2-sp", "delta-noatt", "delta"):
        objective = make_objective(method, beta=beta).eval()
        head = objective.model.fc
        with torch.no_grad():
            head.weight.fill_(0.5)  # 3 x 96 entries
            head.bias.copy_(torch.tensor([1.0, -2.0, 3.0]))
        expected = beta * 0.5 * (3 * 96 * 0.25 + (1 + 4 + 9))  # = 0.1 * 86 = 8.6
        out = objective(*batch())
        assert out["reg/head"].item() == pytest.approx(expected, rel=1e-6), method


def test_plain_l2_and_l2_fe_have_no_regularizer_terms():
    for method in ("l2", "l2-fe"):
        out = make_objective(method).train()(*batch())
        assert not [k for k in out if k.startswith("reg/")], method
        assert torch.equal(out["loss"].detach(), out["ce"])


# --- DELTA ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["delta-noatt", "delta"])
def test_delta_term_is_zero_in_eval_mode_when_target_equals_source_and_positive_in_train_mode(method):
    objective = make_objective(method)
    assert objective.eval()(*batch())["reg/delta"].item() == 0.0
    # Train mode: the target's BatchNorm uses batch statistics, the source's its running statistics.
    assert objective.train()(*batch())["reg/delta"].item() > 0


@pytest.mark.parametrize("method", ["delta-noatt", "delta"])
@pytest.mark.parametrize("reduction", ["sum", "relative"])
def test_with_the_source_on_batch_statistics_the_delta_term_is_exactly_zero_at_step_zero(method, reduction):
    objective = make_objective(method, alpha=1.0, source_bn="batch", reduction=reduction).train()
    images, labels = batch()
    out = objective(images, labels)
    assert out["reg/delta"].item() == 0.0
    # ... while the official source (running statistics) gives a positive term on the same batch: the
    # part of it that measures the statistics alone, which statistics_gap reports in both settings
    official = make_objective(method, alpha=1.0, source_bn="running", reduction=reduction).train()
    step_zero = official(images, labels)["reg/delta"]
    assert step_zero.item() > 0
    torch.testing.assert_close(official.statistics_gap(images), step_zero, rtol=1e-5, atol=0)
    torch.testing.assert_close(objective.statistics_gap(images), step_zero, rtol=1e-5, atol=0)


def test_with_the_source_on_batch_statistics_the_term_measures_what_training_changed():
    model = tiny_model()
    source = copy.deepcopy(model).train()  # the pretrained network on batch statistics, without hooks
    layers = layers_of(model)
    objective = Objective(model, "delta", alpha=1.0, layers=layers, channel_weights=peaked_weights(model, layers),
                          source_bn="batch")
    perturb_backbone(objective.model)
    images, labels = batch()
    target = copy.deepcopy(source)
    target.load_state_dict(objective.model.state_dict())
    with FeatureHooks(target, objective.layers) as t_hooks, FeatureHooks(source, objective.layers) as s_hooks, \
            torch.no_grad():
        target(images)
        source(images)  # a plain copy of the source in train mode: batch statistics
        expected = delta_distance(t_hooks.pop(), s_hooks.pop(), objective.channel_weights())
    torch.testing.assert_close(objective.train()(images, labels)["reg/delta"], expected, rtol=1e-5, atol=0)


def test_the_source_on_batch_statistics_keeps_its_running_statistics_and_draws_nothing_random():
    objective = make_objective("delta-noatt", source_bn="batch")
    before = {k: v.clone() for k, v in objective.source.state_dict().items()}
    for step in range(2):
        objective.train()(*batch(seed=step))
        objective.eval()
    assert all(torch.equal(objective.source.state_dict()[k], v) for k, v in before.items())
    norms = [m for m in objective.source.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    others = [m for m in objective.source.modules() if m not in norms and m is not objective.source]
    assert all(m.training for m in norms) and not any(m.training for m in others)


def test_an_unknown_source_batchnorm_mode_is_refused():
    with pytest.raises(DeltatlError, match="source BatchNorm mode"):
        make_objective("delta-noatt", source_bn="frozen")


def test_delta_with_uniform_channel_weights_equals_delta_noatt():
    model = tiny_model()
    layers = layers_of(model)
    perturb_backbone(model)
    noatt = Objective(copy.deepcopy(model), "delta-noatt", layers=layers, alpha=0.7).train()
    uniform = Objective(copy.deepcopy(model), "delta", layers=layers, alpha=0.7,
                        channel_weights=uniform_weights(model, layers)).train()
    peaked = Objective(copy.deepcopy(model), "delta", layers=layers, alpha=0.7,
                       channel_weights=peaked_weights(model, layers)).train()
    images, labels = batch()
    a, b, c = noatt(images, labels), uniform(images, labels), peaked(images, labels)
    assert a["reg/delta"] > 0
    torch.testing.assert_close(b["reg/delta"], a["reg/delta"], rtol=1e-5, atol=0)
    torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-5, atol=0)
    assert not torch.isclose(c["reg/delta"], a["reg/delta"], rtol=1e-3)  # the weights are used


def test_delta_term_is_alpha_times_the_distance_between_target_and_source_features():
    alpha = 0.5
    model = tiny_model()
    layers = layers_of(model)
    weights = peaked_weights(model, layers)
    source = copy.deepcopy(model).eval()
    objective = Objective(model, "delta", layers=layers, alpha=alpha, channel_weights=weights).train()
    perturb_backbone(objective.model)  # fine-tuning moved the target away from the source
    target = copy.deepcopy(source).train()  # a copy without the objective's hooks
    target.load_state_dict(objective.model.state_dict())
    images, labels = batch()
    with FeatureHooks(target, layers) as t_hooks, FeatureHooks(source, layers) as s_hooks, torch.no_grad():
        target(images)
        source(images)
        expected = alpha * delta_distance(t_hooks.pop(), s_hooks.pop(), weights)
    torch.testing.assert_close(objective(images, labels)["reg/delta"], expected, rtol=1e-5, atol=0)


def test_source_network_gets_no_gradient_and_stays_in_eval_mode_with_fixed_statistics():
    objective = make_objective("delta")
    perturb_backbone(objective.model)
    statistics = {k: v.clone() for k, v in objective.source.state_dict().items()}
    optimizer = torch.optim.SGD(objective.param_groups(), lr=0.1, momentum=0.9)
    for step in range(3):
        objective.train()
        assert objective.training and objective.model.training
        assert not any(m.training for m in objective.source.modules())
        out = objective(*batch(seed=step))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        assert all(p.grad is None and not p.requires_grad for p in objective.source.parameters())
    source_ids = {id(p) for p in objective.source.parameters()}
    assert not source_ids & {id(p) for g in optimizer.param_groups for p in g["params"]}
    after = objective.source.state_dict()
    assert all(torch.equal(after[k], v) for k, v in statistics.items())
    assert not torch.equal(objective.model.state_dict()["bn1.running_mean"], statistics["bn1.running_mean"])


def test_source_forward_stops_after_the_last_tapped_layer_with_the_features_of_a_full_forward():
    model = tiny_model()
    layers = layers_of(model)
    reference = copy.deepcopy(model).eval()
    objective = Objective(model, "delta-noatt", layers=layers).train()
    calls = {"fc": 0, "global_pool": 0}
    for name in calls:
        objective.source.get_submodule(name).register_forward_hook(
            lambda *_args, name=name: calls.__setitem__(name, calls[name] + 1))
    images, labels = batch()
    for _ in range(3):
        objective(images, labels)
        features = objective.source_features(images)
    assert calls == {"fc": 0, "global_pool": 0}
    assert list(features) == layers
    with FeatureHooks(reference, layers) as hooks, torch.no_grad():
        reference(images)
        full = hooks.pop()
    for name in layers:
        assert torch.equal(features[name], full[name]), name


def test_feature_hooks_are_registered_once_and_not_added_by_training_or_evaluation():
    objective = make_objective("delta")
    layers = objective.layers
    # target: one capture hook per layer; source: a capture hook and the early stop per layer
    assert forward_hook_count(objective.model) == len(layers)
    assert forward_hook_count(objective.source) == 2 * len(layers)
    optimizer = torch.optim.SGD(objective.param_groups(), lr=0.01)
    for step in range(4):
        objective.train()
        out = objective(*batch(seed=step))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        objective.eval()
        with torch.no_grad():
            objective(*batch(seed=step))
            objective.model(batch(seed=step)[0])  # what evaluate() does
    assert forward_hook_count(objective.model) == len(layers)
    assert forward_hook_count(objective.source) == 2 * len(layers)


@pytest.mark.parametrize("method", list(METHODS))
def test_forward_returns_the_same_keys_in_train_and_eval_mode(method):
    objective = make_objective(method)
    train_keys = set(objective.train()(*batch()))
    with torch.no_grad():
        eval_keys = set(objective.eval()(*batch()))
    assert train_keys == eval_keys
    assert {"loss", "logits", "ce"} <= train_keys
    expected_terms = {"l2": set(), "l2-fe": set(), "l2-sp": {"reg/l2sp", "reg/head"},
                      "delta-noatt": {"reg/delta", "reg/head"}, "delta": {"reg/delta", "reg/head"},
                      "bss": {"reg/bss"}, "lp-ft": set(), "wise-ft": set(), "lwf": {"reg/lwf"},
                      "co-tuning": {"reg/co-tuning"}, "stochnorm": set()}[method]
    assert {k for k in train_keys if k.startswith("reg/")} == expected_terms


def test_target_features_carry_the_delta_gradient_into_the_backbone_but_not_past_the_last_layer():
    objective = make_objective("delta-noatt", alpha=1.0, beta=0.0).eval()
    perturb_backbone(objective.model, scale=0.1)
    images, labels = batch()
    objective.zero_grad(set_to_none=True)
    F.cross_entropy(objective.model(images), labels).backward()
    ce_only = {n: p.grad.clone() for n, p in objective.model.named_parameters()}
    with_delta = grads(objective, images, labels)
    assert objective(images, labels)["reg/delta"] > 0
    difference = {n: (with_delta[n] - ce_only[n]).abs().max().item() for n in ce_only}
    assert difference["conv1.0.weight"] > 1e-6  # before the first tapped layer
    assert difference["fc.weight"] < 1e-7 and difference["fc.bias"] < 1e-7  # after the last one


# --- L2-FE ----------------------------------------------------------------------------------------

def test_l2_fe_trains_only_the_head_and_keeps_backbone_weights_and_batchnorm_statistics():
    objective = make_objective("l2-fe")
    trainable = [n for n, p in objective.model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    before = {k: v.clone() for k, v in objective.model.state_dict().items()}
    optimizer = torch.optim.SGD(objective.param_groups(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for step in range(3):
        objective.train()
        assert objective.model.training
        assert not any(m.training for m in objective.model.modules() if isinstance(m, nn.BatchNorm2d))
        out = objective(*batch(seed=step))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    after = objective.model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["fc.bias", "fc.weight"]


@pytest.mark.parametrize("method, groups", [("l2-fe", ["head"]), ("l2", ["backbone", "head"]),
                                            ("l2-sp", ["backbone", "head"]), ("delta", ["backbone", "head"])])
def test_param_groups_put_the_head_last(method, groups):
    objective = make_objective(method)
    found = objective.param_groups()
    assert [g["name"] for g in found] == groups
    assert [id(p) for p in found[-1]["params"]] == [id(objective.model.fc.weight), id(objective.model.fc.bias)]
    if len(found) == 2:
        shared, _ = split_parameters(objective.model)
        assert [id(p) for p in found[0]["params"]] == [id(p) for _, p in shared]


# --- regularizer state ----------------------------------------------------------------------------

def test_l2sp_regularizer_state_holds_the_anchors_only_and_restores_them_into_another_objective():
    saved_from = make_objective("l2-sp", seed=0)
    start = {n: p.detach().clone() for n, p in saved_from.model.named_parameters()}
    perturb_backbone(saved_from.model)
    state = saved_from.regularizer_state()
    assert state and all(k.startswith("l2sp.anchor__") for k in state)
    shared, _ = split_parameters(saved_from.model)
    assert len(state) == len(shared)
    assert torch.equal(state["l2sp.anchor__conv1__0__weight"], start["conv1.0.weight"])

    resumed = make_objective("l2-sp", seed=1)  # other weights, as a model rebuilt on resume
    resumed.model.load_state_dict(saved_from.model.state_dict())
    model_before = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    assert resumed.l2sp().item() != pytest.approx(saved_from.l2sp().item())
    resumed.load_regularizer_state(state)
    for name, anchor in zip(resumed.l2sp.names, resumed.l2sp.anchors()):
        assert torch.equal(anchor, start[name]), name
    assert resumed.l2sp().item() == saved_from.l2sp().item() > 0
    assert all(torch.equal(v, model_before[k]) for k, v in resumed.model.state_dict().items())


def test_delta_regularizer_state_holds_the_attention_weights_and_no_model_or_source_tensors():
    saved_from = make_objective("delta", seed=0)
    state = saved_from.regularizer_state()
    assert sorted(state) == [f"delta.attention_{i}" for i in range(len(saved_from.layers))]
    assert not any(k.startswith(("model.", "source.")) for k in state)
    expected = peaked_weights(saved_from.model, saved_from.layers)
    # checkpoints written before DELTA's term was a module of its own named the buffers attention_<i>
    legacy = {k.removeprefix("delta."): v for k, v in state.items()}
    for saved in (state, legacy):
        resumed = make_objective("delta", seed=1, channel_weights=uniform_weights(saved_from.model, saved_from.layers))
        resumed.load_regularizer_state(saved)
        for name, weights in resumed.channel_weights().items():
            assert torch.equal(weights, expected[name]), name
    assert make_objective("delta-noatt").regularizer_state() == {}
    assert make_objective("l2").regularizer_state() == {}


def test_loading_the_regularizer_state_of_another_method_is_refused():
    state = make_objective("l2-sp").regularizer_state()
    with pytest.raises(DeltatlError, match="another method"):
        make_objective("delta").load_regularizer_state(state)
    with pytest.raises(DeltatlError, match="another method"):
        make_objective("l2-sp").load_regularizer_state({})


def test_bss_is_alpha_times_the_smallest_squared_singular_value_of_the_classifier_input():
    from deltatl.models import head_module
    from deltatl.regularizers import batch_spectral_shrinkage

    objective = make_objective("bss", alpha=0.003)
    seen = []
    head_module(objective.model).register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    out = objective(images, labels)
    assert set(out) == {"loss", "logits", "ce", "reg/bss"}
    assert out["reg/bss"].item() == pytest.approx(0.003 * batch_spectral_shrinkage(seen[0]).item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(out["ce"].item() + out["reg/bss"].item(), rel=1e-6)
    out["loss"].backward()  # the term's gradient reaches the backbone
    assert objective.model.conv1[0].weight.grad.abs().sum() > 0
    assert objective._head_input is None  # not kept beyond the step


def test_lwf_distils_the_source_networks_own_classifier_into_a_trained_copy_of_it():
    from deltatl.models import create_model, head_module
    from deltatl.regularizers import knowledge_distillation

    torch.manual_seed(0)
    source = create_model(MODEL, None, pretrained="none")  # the pretrained network, its own 1000 classes
    model = tiny_model(0)
    model.load_state_dict({**model.state_dict(), **{k: v for k, v in source.state_dict().items()
                                                     if not k.startswith("fc.")}})
    with pytest.raises(DeltatlError, match="own classifier"):
        Objective(copy.deepcopy(model), "lwf")
    objective = Objective(model, "lwf", alpha=0.5, source_model=source)
    images, labels = batch()
    with torch.no_grad():  # eval mode: same backbone, same statistics, same head: nothing to distil yet
        assert objective.eval()(images, labels)["reg/lwf"].item() == pytest.approx(0.0, abs=1e-6)
    objective.train()
    out = objective(images, labels)
    seen = []
    hook = head_module(objective.model).register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    objective.model(images)
    hook.remove()
    student = objective.lwf.old_head(seen[0])
    with torch.no_grad():
        teacher = source.eval()(images)
    assert out["reg/lwf"].item() == pytest.approx(0.5 * knowledge_distillation(student, teacher, 2.0).item(),
                                                  rel=1e-5)
    groups = {g["name"]: g["params"] for g in objective.param_groups()}
    assert set(groups) == {"backbone", "head", "regularizers"}
    assert groups["regularizers"] == list(objective.lwf.old_head.parameters())
    assert "lwf.old_head.weight" in objective.regularizer_state()  # trained: checkpointed, resumed


def test_co_tuning_trains_the_source_head_on_the_relationships_soft_labels():
    from deltatl.models import create_model, head_module
    from deltatl.regularizers import soft_cross_entropy

    torch.manual_seed(0)
    source = create_model(MODEL, None, pretrained="none")
    relationship = torch.softmax(torch.randn(NUM_CLASSES, source.fc.out_features), dim=1)
    with pytest.raises(DeltatlError, match="relationship"):
        Objective(tiny_model(0), "co-tuning", source_model=source)
    objective = Objective(tiny_model(0), "co-tuning", alpha=2.3, source_model=source,
                          term_options={"relationship": relationship})
    assert objective.source is None  # no source forward per step: only its classifier is used
    images, labels = batch()
    seen = []
    head_module(objective.model).register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    out = objective(images, labels)
    term = objective.get_submodule("co-tuning")
    expected = 2.3 * soft_cross_entropy(term.source_head(seen[0]), relationship[labels])
    assert out["reg/co-tuning"].item() == pytest.approx(expected.item(), rel=1e-6)
    state = objective.regularizer_state()
    assert torch.equal(state["co-tuning.relationship"], relationship)
    assert {"co-tuning.source_head.weight", "co-tuning.source_head.bias"} <= set(state)


@pytest.mark.parametrize("method", ["l2-sp", "l2-sp+bss"])
def test_the_fused_l2sp_gradient_takes_the_autograd_step_and_logs_the_same_term(method):
    from deltatl.engine.fit import make_optimizer, running_sums, train_step

    states = {}
    for fused in (False, True):
        objective = make_objective(method, alpha=0.3, l2sp_fused=fused)
        perturb_backbone(objective.model)  # away from the starting point: the term has a gradient
        optimizer = make_optimizer(objective, 0.01, 0.9, 0.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        sums = running_sums(torch.device("cpu"))
        assert objective.adds_gradients == fused
        for step in range(3):
            out = train_step(objective.train(), optimizer, scaler, *batch(seed=step), sums)
        states[fused] = ({k: v.clone() for k, v in objective.model.state_dict().items()}, out["reg/l2sp"].item())
    (autograd, term), (fused, fused_term) = states[False], states[True]
    assert fused_term == pytest.approx(term, rel=1e-6)
    assert all(torch.allclose(fused[k].float(), autograd[k].float(), rtol=1e-5, atol=1e-6) for k in autograd)
    moved = max((autograd[k].float() - tiny_model(0).state_dict()[k].float()).abs().max().item()
                for k in autograd if autograd[k].is_floating_point())
    assert moved > 1e-2
