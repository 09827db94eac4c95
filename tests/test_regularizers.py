"""DELTA feature distance, L2-SP and L2 penalties: hand-computed values and invariants."""
import pytest
import torch
from torch import nn

from deltatl.regularizers import L2SP, delta_distance, l2_penalty, l2sp_penalty

torch.set_num_threads(1)


def one_layer_pair() -> tuple[dict, dict]:
    """One layer, B=2, C=2, 2x2 maps; source 0.5 everywhere, target = source + delta.

    Per (sample, channel), delta and mean_hw(delta^2):
      b0 c0  [[1, 2], [3, 4]]    (1 + 4 + 9 + 16) / 4 = 7.5
      b0 c1  [[0, 0], [0, 2]]    4 / 4                = 1
      b1 c0  [[1, -1], [1, -1]]  4 / 4                = 1
      b1 c1  [[2, 0], [0, 0]]    4 / 4                = 1
    """
    delta = torch.tensor([[[[1., 2.], [3., 4.]], [[0., 0.], [0., 2.]]],
                          [[[1., -1.], [1., -1.]], [[2., 0.], [0., 0.]]]])
    source = torch.full_like(delta, 0.5)
    return {"layer": source + delta}, {"layer": source}


def test_delta_distance_with_uniform_weights_matches_the_hand_computed_value():
    target, source = one_layer_pair()
    # 0.5 * (7.5 + 1 + 1 + 1)
    assert delta_distance(target, source).item() == 5.25


def test_delta_distance_with_channel_weights_matches_the_hand_computed_value():
    target, source = one_layer_pair()
    weights = {"layer": torch.tensor([0.75, 0.25])}
    # C * w = [1.5, 0.5]; 0.5 * ((1.5 * 7.5 + 0.5 * 1) + (1.5 * 1 + 0.5 * 1)) = 0.5 * (11.75 + 2)
    assert delta_distance(target, source, weights).item() == 6.875


def test_mean_reduction_is_the_sum_divided_by_the_batch_size():
    target, source = one_layer_pair()
    weights = {"layer": torch.tensor([0.75, 0.25])}
    assert delta_distance(target, source, reduction="mean").item() == 5.25 / 2
    assert delta_distance(target, source, weights, reduction="mean").item() == 6.875 / 2


def test_relative_reduction_divides_each_layer_by_the_sources_summed_squared_activation():
    target, source = one_layer_pair()
    source = {"layer": source["layer"] * 2}  # 1.0 everywhere: sum_b sum_c mean_hw(1) = 4
    target = {"layer": source["layer"] + (target["layer"] - 0.5)}  # the same differences as before
    assert delta_distance(target, source, reduction="relative").item() == 5.25 / 4


@pytest.mark.parametrize("scale", [1e-3, 7.0, 1e4])
def test_the_relative_term_is_unchanged_when_a_layers_activations_are_scaled(scale):
    generator = torch.Generator().manual_seed(0)
    source = {"a": torch.randn(4, 8, 5, 5, generator=generator), "b": torch.randn(4, 16, 3, 3, generator=generator)}
    target = {k: v + 0.3 * torch.randn(v.shape, generator=generator) for k, v in source.items()}
    weights = {"a": torch.softmax(torch.randn(8, generator=generator), 0), "b": torch.full((16,), 1 / 16)}
    reference = delta_distance(target, source, weights, reduction="relative")
    scaled_target, scaled_source = dict(target), dict(source)
    scaled_target["a"], scaled_source["a"] = target["a"] * scale, source["a"] * scale
    torch.testing.assert_close(delta_distance(scaled_target, scaled_source, weights, reduction="relative"),
                               reference, rtol=1e-5, atol=0)
    # ... and with the batch repeated (another batch size) as well
    doubled = {k: torch.cat([v, v]) for k, v in target.items()}, {k: torch.cat([v, v]) for k, v in source.items()}
    torch.testing.assert_close(delta_distance(*doubled, weights, reduction="relative"), reference, rtol=1e-5, atol=0)


def test_given_energies_replace_the_batchs_own():
    target, source = one_layer_pair()
    assert delta_distance(target, source, reduction="relative", energies={"layer": torch.tensor(2.0)}).item() \
        == 5.25 / 2


def test_delta_distance_is_zero_when_target_equals_source():
    features = {"a": torch.randn(3, 4, 5, 5), "b": torch.randn(3, 8)}
    assert delta_distance(features, features).item() == 0.0


def test_uniform_weights_equal_explicit_weights_of_one_over_c():
    target = {"a": torch.randn(3, 4, 5, 5), "b": torch.randn(3, 6, 2, 2)}
    source = {k: torch.randn_like(v) for k, v in target.items()}
    uniform = {k: torch.full((v.shape[1],), 1 / v.shape[1]) for k, v in target.items()}
    torch.testing.assert_close(delta_distance(target, source), delta_distance(target, source, uniform))


def test_the_distance_of_several_layers_is_the_sum_of_their_distances():
    target = {"a": torch.randn(2, 4, 3, 3), "b": torch.randn(2, 6, 2, 2)}
    source = {k: torch.randn_like(v) for k, v in target.items()}
    separate = sum(delta_distance({k: target[k]}, {k: source[k]}) for k in target)
    torch.testing.assert_close(delta_distance(target, source), separate)


def test_two_dimensional_features_count_as_one_pixel():
    target, source = torch.randn(3, 5), torch.randn(3, 5)
    as_maps = delta_distance({"f": target[..., None, None]}, {"f": source[..., None, None]})
    torch.testing.assert_close(delta_distance({"f": target}, {"f": source}), as_maps)
    torch.testing.assert_close(as_maps, 0.5 * (target - source).square().sum())


def test_channels_last_features_give_the_same_value():
    target, source = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    reference = delta_distance({"f": target}, {"f": source})
    cl = delta_distance({"f": target.to(memory_format=torch.channels_last)},
                        {"f": source.to(memory_format=torch.channels_last)})
    torch.testing.assert_close(cl, reference)


def test_bf16_features_give_a_float32_result_computed_from_their_float32_values():
    target = {"f": torch.randn(4, 8, 6, 6).bfloat16()}
    source = {"f": torch.randn(4, 8, 6, 6).bfloat16()}
    value = delta_distance(target, source)
    assert value.dtype == torch.float32
    expected = delta_distance({"f": target["f"].float()}, {"f": source["f"].float()})
    torch.testing.assert_close(value, expected, rtol=0, atol=0)


def test_hand_computed_example_is_exact_in_bf16():
    target, source = one_layer_pair()  # all values are exact in bf16
    value = delta_distance({"layer": target["layer"].bfloat16()}, {"layer": source["layer"].bfloat16()})
    assert value.dtype == torch.float32 and value.item() == 5.25


def test_source_features_are_constants_and_the_target_gradient_is_the_scaled_difference():
    target, source = one_layer_pair()
    t = target["layer"].clone().requires_grad_(True)
    s = source["layer"].clone().requires_grad_(True)
    delta_distance({"layer": t}, {"layer": s}).backward()
    assert s.grad is None
    # d/dFM_t of 0.5 * mean_hw (FM_t - FM_s)^2 = (FM_t - FM_s) / (H * W)
    torch.testing.assert_close(t.grad, (t - s).detach() / 4)


def test_mismatched_layer_names_raise_naming_the_missing_and_extra_layers():
    f = torch.randn(2, 3, 2, 2)
    with pytest.raises(ValueError, match=r"missing \['b'\], extra \['c'\]"):
        delta_distance({"a": f, "b": f}, {"a": f, "c": f})
    with pytest.raises(ValueError, match=r"channel weight layers.*missing \['b'\]"):
        delta_distance({"a": f, "b": f}, {"a": f, "b": f}, {"a": torch.full((3,), 1 / 3)})


def test_wrong_shapes_and_unknown_reductions_raise():
    f = torch.randn(2, 3, 2, 2)
    with pytest.raises(ValueError, match="differ in shape"):
        delta_distance({"a": f}, {"a": f[:1]})
    with pytest.raises(ValueError, match=r"expected \(3,\)"):
        delta_distance({"a": f}, {"a": f}, {"a": torch.ones(4) / 4})
    with pytest.raises(ValueError, match="reduction"):
        delta_distance({"a": f}, {"a": f}, reduction="batchmean")
    with pytest.raises(ValueError, match="no target feature maps"):
        delta_distance({}, {})


def test_l2sp_penalty_matches_the_hand_computed_value():
    params = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    anchors = [torch.tensor([0.0, 0.5]), torch.tensor([[1.0]])]
    # 0.5 * (1^2 + 1.5^2) + 0.5 * 2^2 = 1.625 + 2
    assert l2sp_penalty(params, anchors).item() == 3.625


def test_l2_penalty_matches_the_hand_computed_value():
    # 0.5 * (1 + 4 + 9) + 0.5 * 16
    assert l2_penalty([torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0])]).item() == 15.0


def test_penalties_accumulate_low_precision_parameters_in_float32():
    params = [torch.full((1000,), 0.01, dtype=torch.bfloat16)]
    value = l2_penalty(params)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, 0.5 * 1000 * params[0][0].float() ** 2)
    assert l2sp_penalty(params, [torch.zeros(1000)]).dtype == torch.float32


def test_l2sp_penalty_rejects_mismatched_anchors():
    with pytest.raises(ValueError, match="1 parameters but 2 anchors"):
        l2sp_penalty([torch.ones(2)], [torch.ones(2), torch.ones(2)])
    with pytest.raises(ValueError, match="shape"):
        l2sp_penalty([torch.ones(2)], [torch.ones(3)])


def small_backbone() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1))


def test_l2sp_is_zero_at_the_start_with_a_finite_gradient():
    model = small_backbone()
    penalty = L2SP(model.named_parameters())
    value = penalty()
    assert value.item() == 0.0
    value.backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def test_l2sp_gradient_is_alpha_times_the_distance_from_the_start():
    model = small_backbone()
    penalty = L2SP(model.named_parameters())
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    alpha = 0.01
    (alpha * penalty()).backward()
    for p, p0 in zip(model.parameters(), start):
        torch.testing.assert_close(p.grad, alpha * (p.detach() - p0))
    expected = sum(0.5 * (p.detach() - p0).square().sum() for p, p0 in zip(model.parameters(), start))
    torch.testing.assert_close(penalty(), expected)


def test_l2sp_covers_batchnorm_affine_parameters_but_no_running_statistics():
    model = small_backbone()
    penalty = L2SP(model.named_parameters())
    assert "1.weight" in penalty.names and "1.bias" in penalty.names
    assert not any("running" in name for name in penalty.names)
    assert list(penalty.parameters()) == []  # the live parameters belong to the model


def test_l2sp_anchors_are_in_the_state_dict_and_restored_exactly():
    model = small_backbone()
    saved = L2SP(model.named_parameters()).state_dict()
    assert set(saved) == {"anchor__0__weight", "anchor__0__bias", "anchor__1__weight", "anchor__1__bias",
                          "anchor__2__weight", "anchor__2__bias"}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    resumed = L2SP(model.named_parameters())  # built from the moved weights, as after a resume
    resumed.load_state_dict(saved)
    for anchor, (name, _) in zip(resumed.anchors(), model.named_parameters()):
        assert torch.equal(anchor, saved["anchor__" + name.replace(".", "__")])
    n = sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(resumed(), torch.tensor(0.5 * n))


def test_l2sp_rejects_empty_and_repeated_names():
    with pytest.raises(ValueError, match="at least one"):
        L2SP([])
    p = nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="repeated"):
        L2SP([("a.b", p), ("a__b", p)])


# --- BSS: Batch Spectral Shrinkage ---------------------------------------------------------------------

@pytest.mark.parametrize("shape, k", [((8, 20), 1), ((8, 20), 3), ((20, 6), 2), ((5, 5), 5)])
def test_batch_spectral_shrinkage_is_the_sum_of_the_k_smallest_squared_singular_values(shape, k):
    import numpy as np

    from deltatl.regularizers import batch_spectral_shrinkage

    features = torch.randn(*shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    singular = np.linalg.svd(features.numpy(), compute_uv=False)  # descending
    expected = float(np.sum(np.sort(singular)[:k] ** 2))
    assert batch_spectral_shrinkage(features, k).item() == pytest.approx(expected, rel=1e-5)
    # the authors' computation: a full SVD of F^T, the last singular values
    _, s, _ = torch.linalg.svd(features.t().float())
    assert batch_spectral_shrinkage(features, k).item() == pytest.approx(s[-k:].square().sum().item(), rel=1e-5)


def test_batch_spectral_shrinkage_has_a_gradient_that_shrinks_the_smallest_direction():
    from deltatl.regularizers import batch_spectral_shrinkage

    features = torch.randn(6, 10, generator=torch.Generator().manual_seed(0), requires_grad=True)
    before = batch_spectral_shrinkage(features)
    before.backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0
    with torch.no_grad():
        after = batch_spectral_shrinkage(features - 0.1 * features.grad)
    assert after < before
    # flattened per image: (b, c, 1, 1) pooled maps are (b, c)
    assert batch_spectral_shrinkage(features.detach().view(6, 10, 1, 1)) == batch_spectral_shrinkage(features.detach())


def test_batch_spectral_shrinkage_refuses_a_k_beyond_the_rank():
    from deltatl.regularizers import batch_spectral_shrinkage

    with pytest.raises(ValueError, match="between 1 and min"):
        batch_spectral_shrinkage(torch.randn(4, 10), k=5)


# --- LwF: knowledge distillation -----------------------------------------------------------------------

def test_knowledge_distillation_is_t_squared_times_the_batch_mean_kl_of_the_softened_distributions():
    from deltatl.regularizers import knowledge_distillation

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g,
                                                                                         dtype=torch.float64)
    for t in (1.0, 2.0, 3.0):
        p = torch.exp(teacher / t) / torch.exp(teacher / t).sum(1, keepdim=True)
        q = torch.exp(student / t) / torch.exp(student / t).sum(1, keepdim=True)
        expected = t ** 2 * (p * (p.log() - q.log())).sum(1).mean()
        assert knowledge_distillation(student, teacher, t).item() == pytest.approx(expected.item(), rel=1e-5)
    assert knowledge_distillation(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="positive"):
        knowledge_distillation(student, teacher, 0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        knowledge_distillation(student, teacher[:, :3], 2.0)


# --- Co-Tuning -----------------------------------------------------------------------------------------

def test_the_relationship_is_the_mean_source_softmax_of_each_target_class():
    from deltatl.errors import DeltatlError
    from deltatl.regularizers import source_relationship

    source = nn.Linear(3, 5)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(7, 3, generator=g), torch.tensor([0, 1, 0, 2, 1, 0, 2])
    batches = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    relationship = source_relationship(source, batches, num_classes=3)
    probabilities = torch.softmax(source(images).double(), dim=1)
    for t in range(3):
        assert torch.allclose(relationship[t].double(), probabilities[labels == t].mean(0), atol=1e-6)
    assert torch.allclose(relationship.sum(1), torch.ones(3))
    with pytest.raises(DeltatlError, match="every class"):
        source_relationship(source, batches, num_classes=4)


def test_soft_cross_entropy_is_the_cross_entropy_against_a_distribution():
    from deltatl.regularizers import soft_cross_entropy

    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(6, 4, generator=g), torch.tensor([0, 3, 1, 1, 2, 0])
    one_hot = torch.nn.functional.one_hot(labels, 4).float()
    assert soft_cross_entropy(logits, one_hot).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    q = torch.softmax(torch.randn(6, 4, generator=g), dim=1)
    expected = -(q * torch.log_softmax(logits, dim=1)).sum(1).mean()
    assert soft_cross_entropy(logits, q).item() == pytest.approx(expected.item(), rel=1e-6)
