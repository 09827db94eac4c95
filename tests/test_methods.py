"""Methods and their compositions: what each is made of, and the compositions refused."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import TINY_TRAIN_ARGS
from deltatl.errors import DeltatlError
from deltatl.methods import ADD_ONS, METHODS, get_method


def test_every_method_uses_alpha_exactly_when_it_has_a_term_weighted_by_it():
    for method in METHODS.values():
        assert method.uses("alpha") == any(t.weight == "alpha" for t in method.terms)
    assert not get_method("l2").uses("alpha") and get_method("delta").uses("beta")


@pytest.mark.parametrize("spec, terms, weights", [
    ("delta+bss", [("delta", "alpha"), ("head", "beta"), ("bss", "bss")], {"bss": 0.001}),
    ("l2-sp+lwf", [("l2sp", "alpha"), ("head", "beta"), ("lwf", "lwf")], {"lwf": 1.0}),
    ("l2-sp+bss+co-tuning", [("l2sp", "alpha"), ("head", "beta"), ("bss", "bss"), ("co-tuning", "co-tuning")],
     {"bss": 0.001, "co-tuning": 2.3}),
    ("lp-ft+delta", [("delta", "alpha"), ("head", "beta")], {}),
    ("stochnorm+bss", [("bss", "alpha")], {}),
])
def test_a_composition_keeps_the_first_methods_terms_and_joins_add_ons_with_their_authors_weight(spec, terms,
                                                                                               weights):
    method = get_method(spec)
    assert method.name == spec
    assert [(t.regularizer, t.weight) for t in method.terms] == terms
    assert dict(method.term_weights) == weights
    first = next(get_method(p) for p in spec.split("+") if get_method(p).terms)
    assert method.weight_decay == first.weight_decay and method.default_alpha == first.default_alpha
    assert method.linear_probe == ("lp-ft" in spec) and (method.stochnorm is not None) == ("stochnorm" in spec)
    assert method.attention == get_method("delta").attention if "delta" in spec.split("+") else not method.attention


@pytest.mark.parametrize("spec, fragment", [
    ("l2+bss", "do not compose"), ("l2-fe+delta", "do not compose"), ("bss+bss", "twice"),
    ("lp-ft+wise-ft", "already starts with lp-ft"), ("delta+l2-sp", "cannot join"), ("bss+delta", "cannot join"),
    ("delta+nope", "unknown method 'nope'"),
])
def test_compositions_that_make_no_sense_are_refused_with_one_line(spec, fragment):
    with pytest.raises(DeltatlError, match=fragment):
        get_method(spec)
    assert set(ADD_ONS) <= set(METHODS)


def test_delta_plus_bss_trains_both_terms_and_compares_with_rifle(cli, image_folder, tmp_path):
    root = image_folder()
    run = tmp_path / "delta-bss"
    result = cli("train", "--data", root, *TINY_TRAIN_ARGS, "--method", "delta+bss", "--delta-layers", "layer1",
                 "--attention-epochs", "1", "--attention-batch-size", "4", "--attention-cache", tmp_path / "cache",
                 "--out", run)
    assert result.code == 0, result.err
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train/reg/delta", "train/reg/head", "train/reg/bss"} <= set(row)
    assert json.loads((run / "summary.json").read_text())["method"] == "delta+bss"
    compared = cli("compare", "--data", root, *TINY_TRAIN_ARGS, "--epochs", "2", "--methods", "l2", "lp-ft+bss+rifle1",
                   "--seeds", "1", "--attention-epochs", "1", "--attention-batch-size", "4", "--out", tmp_path / "cmp")
    assert compared.code == 0, compared.err
    assert (tmp_path / "cmp" / "lp-ft+bss+rifle1").is_dir()
    summary = next((tmp_path / "cmp" / "lp-ft+bss+rifle1").rglob("summary.json"))
    assert json.loads(summary.read_text())["rifle"] == 1
    assert torch.load(summary.parent / "linear_probe" / "checkpoint.pt", weights_only=True)["done"]


def test_lp_ft_plus_delta_scores_attention_on_the_fresh_head_as_plain_delta_does(cli, image_folder, tmp_path):
    """The attention cache key assumes a fresh head: LP-FT's probed head goes on only after scoring."""
    root = image_folder()
    flags = ["--data", root, *TINY_TRAIN_ARGS, "--delta-layers", "layer1", "--attention-epochs", "1",
             "--attention-batch-size", "4"]
    for method, cache in (("delta", "cache-a"), ("lp-ft+delta", "cache-b")):
        result = cli("train", *flags, "--method", method, "--attention-cache", tmp_path / cache,
                     "--out", tmp_path / method)
        assert result.code == 0, result.err
    assert (tmp_path / "delta" / "attention.json").read_text() == (tmp_path / "lp-ft+delta" / "attention.json").read_text()
    # one L2-FE fit serves as LP-FT's probe and as the attention's model: no second fit
    run = tmp_path / "lp-ft+delta"
    assert not (run / "linear_probe").exists()
    fits = list((run / "attention_fe").iterdir())
    assert len(fits) == 1 and torch.load(fits[0] / "checkpoint.pt", weights_only=True)["done"]
    assert len((fits[0] / "metrics.jsonl").read_text().splitlines()) == 1  # one epoch, trained once


def test_compare_interpolates_its_own_lp_ft_plus_delta_runs_for_wise_ft_plus_delta(cli, image_folder, tmp_path):
    out = tmp_path / "cmp"
    result = cli("compare", "--data", image_folder(val=2), *TINY_TRAIN_ARGS, "--epochs", "2", "--delta-layers",
                 "layer1", "--attention-epochs", "1", "--attention-batch-size", "4", "--attention-cache",
                 tmp_path / "cache", "--methods", "lp-ft+delta", "wise-ft+delta", "--seeds", "1", "--out", out)
    assert result.code == 0, result.err
    wise = json.loads(next((out / "wise-ft+delta").rglob("summary.json")).read_text())
    lp_ft = next((out / "lp-ft+delta").rglob("summary.json"))
    assert not list((out / "wise-ft+delta").rglob("fine_tuned"))  # no second fine-tuning
    assert wise["wise_ft"]["fine_tuned_val_top1"] == json.loads(lp_ft.read_text())["val_top1"]
    assert os.path.samefile(os.path.join(next((out / "wise-ft+delta").rglob("summary.json")).parent,
                                         wise["wise_ft"]["fine_tuned"]), lp_ft.parent)
