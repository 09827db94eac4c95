"""``deltatl attention`` and ``train --method delta --attention-file``: files, cache, official format."""
from __future__ import annotations

import json

import pytest
import timm
import torch

import deltatl.attention.estimate
import deltatl.run
from deltatl.attention import FORMAT, normalize_scores, read_scores
from deltatl.attention import layer_channels
from deltatl.features import layer_preset
from deltatl.models import create_model

ATTENTION = ["--attention-epochs", "1", "--attention-batches", "1", "--attention-batch-size", "4"]


@pytest.fixture(scope="module")
def preset() -> tuple[list[str], dict[str, int]]:
    """test_resnet's preset layers and their channel counts."""
    model = create_model("test_resnet", 3, pretrained="none")
    layers = layer_preset(model, "test_resnet")
    return layers, layer_channels(model, layers, 32)


@pytest.fixture
def attention(cli, tiny_train_args, tmp_path):
    """``attention(data, output, *flags)``: ``deltatl attention`` with the tiny flags and a private cache."""

    def run(data, output, *flags):
        return cli("attention", "--data", data, *tiny_train_args, *ATTENTION, "--attention-cache",
                   tmp_path / "cache", "--output", output, *flags)

    return run


def forbid_computing(monkeypatch) -> None:
    def no_fit(*args, **kwargs):
        raise AssertionError("the channel attention was computed again")

    monkeypatch.setattr(deltatl.attention.estimate, "fit", no_fit)
    monkeypatch.setattr(deltatl.run, "estimate_channel_attention", no_fit)


def test_attention_writes_raw_scores_for_the_preset_layers_in_deltatl_format(attention, image_folder, tmp_path,
                                                                             preset):
    layers, channels = preset
    output = tmp_path / "scores.json"
    result = attention(image_folder(), output, "--out", tmp_path / "work")
    assert result.code == 0, result.err
    doc = json.loads(output.read_text())
    assert doc["format"] == FORMAT and doc["meta"]["layers"] == layers
    scores = read_scores(output, layers, channels)
    assert list(scores) == layers
    assert all(torch.isfinite(s).all() for s in scores.values())
    assert scores[layers[-1]].abs().sum() > 0  # (timm zero-initialises BN after layer1.0.conv2: 0 there)
    for name in layers:
        assert name in result.out
    assert f"raw scores written to {output}" in result.out
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    assert list((tmp_path / "work").rglob("checkpoint.pt"))  # the L2-FE fit works in --out


def test_a_second_call_with_the_same_settings_reads_the_cache_without_refitting(attention, image_folder,
                                                                                  tmp_path, monkeypatch, preset):
    data = image_folder()
    assert attention(data, tmp_path / "first.json", "--out", tmp_path / "work").code == 0
    forbid_computing(monkeypatch)
    again = attention(data, tmp_path / "second.json", "--out", tmp_path / "other-work")
    assert again.code == 0, again.err
    layers, channels = preset
    first = read_scores(tmp_path / "first.json", layers, channels)
    second = read_scores(tmp_path / "second.json", layers, channels)
    assert all(torch.equal(first[n], second[n]) for n in layers)
    assert not (tmp_path / "other-work").exists()
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1


def test_another_dataset_in_the_same_work_folder_does_not_reuse_the_first_datasets_l2_fe_fit(
        attention, image_folder, tmp_path):
    torch.manual_seed(1)
    source = tmp_path / "source.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), source)
    fixed = ["--checkpoint", source, "--head-init", "zero"]  # a fixed starting point
    first = image_folder("first")
    other = image_folder("other", classes=("cyan", "magenta", "black"))
    assert attention(first, tmp_path / "first.json", "--out", tmp_path / "work", *fixed).code == 0
    assert attention(other, tmp_path / "reused.json", "--out", tmp_path / "work", *fixed).code == 0
    assert attention(other, tmp_path / "fresh.json", "--out", tmp_path / "new-work", "--attention-cache",
                     tmp_path / "new-cache", *fixed).code == 0
    assert attention(other, tmp_path / "fresh2.json", "--out", tmp_path / "new-work2", "--attention-cache",
                     tmp_path / "new-cache2", *fixed).code == 0
    reused, fresh = read_scores(tmp_path / "reused.json"), read_scores(tmp_path / "fresh.json")
    fresh2 = read_scores(tmp_path / "fresh2.json")
    assert all(torch.equal(fresh[n], fresh2[n]) for n in fresh)  # deterministic from a fixed start
    for name in fresh:
        torch.testing.assert_close(reused[name], fresh[name], rtol=0, atol=1e-6)


def train_delta(cli, tiny_train_args, data, out, *flags):
    return cli("train", "--data", data, *tiny_train_args, "--method", "delta", "--out", out, *flags)


def test_train_with_an_attention_file_uses_its_scores_and_computes_nothing(
        cli, tiny_train_args, attention, image_folder, tmp_path, monkeypatch, preset):
    data = image_folder()
    scores_file = tmp_path / "scores.json"
    assert attention(data, scores_file, "--out", tmp_path / "work").code == 0
    forbid_computing(monkeypatch)
    run = tmp_path / "run"
    result = train_delta(cli, tiny_train_args, data, run, "--attention-file", scores_file,
                         "--attention-cache", tmp_path / "unused-cache")
    assert result.code == 0, result.err
    layers, channels = preset
    given = read_scores(scores_file, layers, channels)
    used = read_scores(run / "attention.json", layers, channels)
    assert all(torch.equal(given[n], used[n]) for n in layers)
    assert not (run / "attention_fe").exists() and not (tmp_path / "unused-cache").exists()


def test_an_official_list_of_lists_file_is_mapped_in_order_onto_the_layers(cli, tiny_train_args, image_folder,
                                                                            tmp_path, monkeypatch, preset):
    layers, channels = preset
    # distinct, recognisable scores per layer: layer i scores channel j as (i + 1) * j
    official = [[float((i + 1) * j) for j in range(channels[name])] for i, name in enumerate(layers)]
    scores_file = tmp_path / "official.json"
    scores_file.write_text(json.dumps(official))
    forbid_computing(monkeypatch)
    run = tmp_path / "run"
    result = train_delta(cli, tiny_train_args, image_folder(), run, "--attention-file", scores_file,
                         "--attention-temperature", "2")
    assert result.code == 0, result.err
    used = read_scores(run / "attention.json", layers, channels)
    assert [used[name].tolist() for name in layers] == official
    weights = normalize_scores(dict(zip(layers, official)), temperature=2.0)
    regularizer = torch.load(run / "checkpoint.pt", weights_only=False)["regularizer"]
    for i, name in enumerate(layers):
        assert torch.equal(regularizer[f"delta.attention_{i}"], weights[name]), name


@pytest.mark.parametrize("kind", ["official", "deltatl"])
def test_an_attention_file_with_a_wrong_channel_count_is_one_error_line(cli, tiny_train_args, image_folder,
                                                                        tmp_path, preset, kind):
    layers, channels = preset
    entries = {name: [0.5] * channels[name] for name in layers}
    entries[layers[2]] = [0.5] * (channels[layers[2]] + 1)
    scores_file = tmp_path / "bad.json"
    doc = list(entries.values()) if kind == "official" else {"format": FORMAT, "layers": entries, "meta": {}}
    scores_file.write_text(json.dumps(doc))
    result = train_delta(cli, tiny_train_args, image_folder(), tmp_path / "run", "--attention-file", scores_file)
    assert result.code == 2
    assert "Traceback" not in result.err
    assert len(result.err_lines) == 1, result.err
    line = result.err_lines[0]
    assert line.startswith("deltatl: error: --attention-file: ")
    assert layers[2] in line and f"expected {channels[layers[2]]} channels, found {channels[layers[2]] + 1}" in line
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_the_attention_l2_fe_fit_follows_the_official_exponential_lr_per_epoch(attention, image_folder, tmp_path):
    # channel_eval.py: ExponentialLR(gamma=0.1 ** (1 / 6)) stepped once per epoch: 0.01, 0.00681, 0.00464, ...
    work = tmp_path / "work"
    result = attention(image_folder(), tmp_path / "scores.json", "--out", work, "--attention-epochs", "10")
    assert result.code == 0, result.err
    (metrics,) = work.glob("attention_fe/*/metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 11))
    expected = [0.01 * 0.1 ** (epoch / 6) for epoch in range(10)]
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("content", ["my notes\n", '{"format": "something else"}', "[1, 2]"])
def test_attention_output_never_replaces_a_file_it_did_not_write(attention, image_folder, tmp_path, content):
    notes = tmp_path / "notes.txt"
    notes.write_text(content)
    result = attention(image_folder(), notes, "--out", tmp_path / "work")
    assert result.code == 2 and "exists and is not a deltatl attention file" in result.err
    assert notes.read_text() == content
    assert not (tmp_path / "work").exists()  # refused before any work


def test_attention_output_replaces_its_own_earlier_file(attention, image_folder, tmp_path):
    output = tmp_path / "scores.json"
    assert attention(image_folder(), output, "--out", tmp_path / "work").code == 0
    first = output.read_text()
    assert attention(image_folder(), output, "--out", tmp_path / "work").code == 0
    assert json.loads(output.read_text())["format"] == json.loads(first)["format"] == FORMAT


def test_the_default_cache_is_deltatl_cache_else_xdg_cache_home_else_home(monkeypatch, tmp_path):
    from deltatl.outputs import cache_dir

    monkeypatch.setenv("DELTATL_CACHE", str(tmp_path / "mine"))
    assert cache_dir("attention") == str(tmp_path / "mine" / "attention")
    monkeypatch.delenv("DELTATL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("attention") == str(tmp_path / "xdg" / "deltatl" / "attention")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == str(tmp_path / "home" / ".cache" / "deltatl")
