"""The command line end to end on a tiny model and a tiny image folder: train, eval, predict."""
from __future__ import annotations

import json
import re

import pytest
import timm
import torch
import yaml

from conftest import CLASS_COLOURS, TINY_TRAIN_ARGS, make_image, write_png
from deltatl.cli import main
from deltatl.config import OFFICIAL_ALPHA
from deltatl.data.splits import read_list
from deltatl.predict import load_trained

SUMMARY_KEYS = {"method", "model", "val_top1", "test_top1", "epochs", "seconds"}


@pytest.mark.parametrize("command, flag", [
    ([], "train"),
    (["train"], "--train-per-class"),
    (["eval"], "--split"),
    (["predict"], "--top-k"),
    (["export"], "--out"),
    (["demo"], "--methods"),
])
def test_help_works_for_every_subcommand(capsys, command, flag):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: deltatl")
    assert flag in out


def test_train_help_lists_every_flag_the_issue_asks_for(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--data", "--data-root", "--model", "--method", "--epochs", "--iters", "--batch-size", "--lr",
                 "--image-size", "--train-per-class", "--seed", "--device", "--out", "--resume", "--config"):
        assert flag in help_text, flag


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One small finished l2 run (2 epochs), shared by the read-only tests below."""
    base = tmp_path_factory.mktemp("cli")
    data = base / "data"
    for label, cls in enumerate(("red", "green", "blue")):
        for split, count, offset in (("train", 8, 0), ("test", 3, 1000)):
            for i in range(count):
                write_png(data / split / cls / f"{i}.png", make_image(label, offset + i, CLASS_COLOURS[cls]))
    out = base / "run"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["train", "--data", str(data), *TINY_TRAIN_ARGS, "--method", "l2", "--epochs", "2", "--lr",
                     "0.05", "--out", str(out)])
    finally:
        torch.set_num_threads(previous)
    assert code == 0
    return {"data": data, "out": out}


def test_train_writes_config_metrics_summary_checkpoint_and_split_lists(finished_run):
    out = finished_run["out"]
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt",
                                               "splits"}
    assert not list(out.rglob("*.tmp"))
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"] == "test_resnet" and config["epochs"] == 2 and config["lr"] == 0.05
    assert "device" not in config and "out" not in config

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert {"train/loss", "train/ce", "val/top1", "val/loss", "lr", "step"} <= set(row)
        assert 0 <= row["val/top1"] <= 100

    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["method"] == "l2" and summary["model"] == "test_resnet" and summary["epochs"] == 2
    assert summary["classes"] == ["blue", "green", "red"]
    assert 0 <= summary["test_top1"] <= 100 and summary["seconds"] >= 0
    assert summary["val_top1"] == rows[-1]["val/top1"]


def test_split_lists_in_the_run_directory_cover_the_data_without_overlap(finished_run):
    lists = {s: read_list(str(finished_run["out"] / "splits" / f"{s}.txt")) for s in ("train", "val", "test")}
    train, val, test = (set(lists[s][0]) for s in ("train", "val", "test"))
    assert not train & val and not (train | val) & test
    assert len(train | val) == 24 and len(test) == 9
    on_disk = {str(p.relative_to(finished_run["data"])) for p in finished_run["data"].rglob("*.png")}
    assert train | val | test == on_disk
    for ids, targets in lists.values():
        assert all(["blue", "green", "red"][t] == i.split("/")[1] for i, t in zip(ids, targets))


@pytest.mark.parametrize("split, key", [("test", "test_top1"), ("val", "val_top1")])
def test_eval_reproduces_the_summary_accuracy(finished_run, capsys, split, key):
    summary = json.loads((finished_run["out"] / "summary.json").read_text())
    assert main(["eval", str(finished_run["out"]), "--split", split, "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    match = re.fullmatch(rf"{split}: top-1 ([\d.]+)%  loss ([\d.]+)  \((\d+) images\)\n", out)
    assert match, out
    assert float(match.group(1)) == pytest.approx(summary[key], abs=0.006)
    assert float(match.group(2)) == pytest.approx(summary[key.replace("top1", "loss")], abs=1e-3)
    assert int(match.group(3)) == {"test": 9, "val": 6}[split]


def test_eval_accepts_the_checkpoint_file_itself(finished_run, capsys):
    assert main(["eval", str(finished_run["out"] / "checkpoint.pt"), "--device", "cpu", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("test: top-1 ")


def test_predict_with_a_run_prints_the_runs_class_names(finished_run, capsys):
    image = finished_run["data"] / "test" / "red" / "0.png"
    assert main(["predict", "--checkpoint", str(finished_run["out"]), str(image), "--top-k", "3",
                 "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(image)
    predicted = [re.fullmatch(r"\s+([\d.]+)%  (\w+)", line) for line in lines[1:]]
    assert all(predicted), lines
    assert sorted(m.group(2) for m in predicted) == ["blue", "green", "red"]
    assert sum(float(m.group(1)) for m in predicted) == pytest.approx(100, abs=0.05)
    probs = [float(m.group(1)) for m in predicted]
    assert probs == sorted(probs, reverse=True)


def test_predict_on_an_unreadable_file_is_one_error_line(finished_run, tmp_path, capsys):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"nope")
    assert main(["predict", "--checkpoint", str(finished_run["out"]), str(junk), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatl: error: cannot read image") and err.count("\n") == 1


def test_eval_of_a_folder_without_a_run_is_one_error_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"deltatl: error: no checkpoint at {tmp_path}/checkpoint.pt\n"


def test_fashion_mnist_from_data_root_trains_and_evaluates_after_the_files_moved(cli, fashion_mnist_root, tiny_train_args, tmp_path):
    out = tmp_path / "fm"
    result = cli("train", "--data", "fashion-mnist", "--data-root", fashion_mnist_root, "--train-per-class", "2",
                 "--val-per-class", "1", *tiny_train_args, "--out", out)
    assert result.code == 0, result.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_images"] == 20
    assert len(summary["classes"]) == 10
    assert len((out / "splits" / "test.txt").read_text().splitlines()) == 20

    moved = tmp_path / "moved"
    fashion_mnist_root.rename(moved)
    missing = cli("eval", out, "--device", "cpu", "--quiet")
    assert missing.code == 2 and missing.err_lines[0].startswith("deltatl: error: Fashion-MNIST idx files")
    found = cli("eval", out, "--data-root", moved, "--device", "cpu", "--quiet")
    assert found.code == 0, found.err
    assert found.out.startswith(f"test: top-1 {summary['test_top1']:.2f}%")


@pytest.fixture
def source_checkpoint(tmp_path):
    """A random test_resnet state dict saved as a timm checkpoint file, and the weights in it."""
    torch.manual_seed(1)
    weights = timm.create_model("test_resnet").state_dict()
    path = tmp_path / "source.pth"
    torch.save(weights, path)
    return path, weights


def train_from(cli, data, source, method, out, tiny_train_args):
    result = cli("train", "--data", data, *tiny_train_args, "--epochs", "2", "--lr", "0.1", "--method", method,
                 "--checkpoint", source, "--head-init", "zero", "--out", out)
    assert result.code == 0, result.err
    assert "test top-1 %" in result.out and method in result.out
    model, info = load_trained(str(out))
    return model.state_dict(), info


def backbone_differences(trained, source):
    return [k for k in source if not k.startswith("fc.") and not torch.equal(trained[k], source[k])]


def test_l2_fe_trains_only_the_head_and_keeps_every_backbone_weight_and_statistic(
        cli, image_folder, source_checkpoint, tiny_train_args, tmp_path):
    path, source = source_checkpoint
    trained, info = train_from(cli, image_folder(), path, "l2-fe", tmp_path / "fe", tiny_train_args)
    assert info["method"] == "l2-fe"
    assert backbone_differences(trained, source) == []  # weights and BatchNorm running statistics
    assert trained["fc.weight"].shape == (3, 96)
    assert trained["fc.weight"].abs().sum() > 0 and trained["fc.bias"].abs().sum() > 0  # moved from zero init


def test_l2_trains_the_backbone_too(cli, image_folder, source_checkpoint, tiny_train_args, tmp_path):
    path, source = source_checkpoint
    trained, info = train_from(cli, image_folder(), path, "l2", tmp_path / "l2", tiny_train_args)
    assert info["method"] == "l2"
    changed = backbone_differences(trained, source)
    assert "conv1.0.weight" in changed and any("running_mean" in k for k in changed)
    assert trained["fc.weight"].abs().sum() > 0


@pytest.mark.parametrize("source_bn", ["batch", "running"])
def test_a_delta_run_logs_per_epoch_how_much_of_its_term_batchnorm_statistics_alone_make(
        cli, image_folder, tiny_train_args, tmp_path, source_bn):
    run = tmp_path / "run"
    result = cli("train", "--data", image_folder(), *[a for a in tiny_train_args if a not in ("--epochs", "1")],
                 "--epochs", "2", "--method", "delta-noatt", "--delta-source-bn", source_bn, "--out", run)
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["delta/bn_gap"] > 0 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    # test_resnet is not the embedded model: the authors' alpha, and the run says so
    assert summary["alpha"] == OFFICIAL_ALPHA and summary["alpha_from"].startswith("the authors' default")


def test_bss_runs_resumes_and_compares_like_any_method(cli, image_folder, tmp_path):
    """A method beyond the papers, built from the registry alone, goes through train, resume and compare."""
    root = image_folder()
    run = tmp_path / "bss"
    first = cli("train", "--data", root, *TINY_TRAIN_ARGS, "--method", "bss", "--epochs", "2", "--out", run)
    assert first.code == 0, first.err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(row["train/reg/bss"] > 0 for row in rows)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["alpha"] == 0.001 and "beta" not in config  # BSS's authors' eta; no head term
    again = cli("train", "--data", root, *TINY_TRAIN_ARGS, "--method", "bss", "--epochs", "2", "--out", run)
    assert again.code == 0 and json.loads((run / "summary.json").read_text())["method"] == "bss"
    compared = cli("compare", "--data", root, *TINY_TRAIN_ARGS, "--methods", "l2", "bss", "--seeds", "2",
                   "--alpha-grid", "bss=0.001,0.01", "--out", tmp_path / "cmp")
    assert compared.code == 0, compared.err
    table = (tmp_path / "cmp" / "results.md").read_text()
    assert re.search(r"^\| bss \| 0\.0(01|1) \| ", table, re.M), table  # alpha chosen on the grid
    assert re.search(r"^\| bss \| l2 \| 2 \| ", table, re.M), table  # paired with l2


def test_lp_ft_starts_fine_tuning_from_the_linear_probe_head(cli, image_folder, tmp_path, monkeypatch):
    """The head that fine-tuning starts from is the probe's (rank 0's L2-FE fit), the backbone the source's."""
    import deltatl.run
    from deltatl.models import head_module, split_parameters

    started = {}
    fit = deltatl.run.fit

    def recording_fit(objective, *args, **kwargs):
        started["head"] = {k: v.clone() for k, v in head_module(objective.model).state_dict().items()}
        started["backbone"] = {n: p.detach().clone() for n, p in split_parameters(objective.model)[0]}
        return fit(objective, *args, **kwargs)

    monkeypatch.setattr(deltatl.run, "fit", recording_fit)
    run = tmp_path / "lp"
    flags = ["--data", image_folder(), *TINY_TRAIN_ARGS, "--method", "lp-ft", "--attention-epochs", "2",
             "--attention-batch-size", "4", "--out", run]
    result = cli("train", *flags)
    assert result.code == 0, result.err
    probe = torch.load(run / "linear_probe" / "checkpoint.pt", weights_only=True)
    assert probe["done"] and probe["step"] == 2 * (18 // 4)
    for key, value in started["head"].items():
        assert torch.equal(value, probe["model"][f"fc.{key}"]), key
    source = {n: p for n, p in split_parameters(load_trained(run)[0])[0]}  # after fine-tuning: moved
    assert any(not torch.equal(started["backbone"][n], source[n]) for n in source)
    assert all(torch.equal(started["backbone"][n], probe["model"][n]) for n in started["backbone"])  # frozen in the probe
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["attention_epochs"] == 2 and "attention_temperature" not in config and "alpha" not in config


def test_tensorboard_events_hold_every_logged_scalar_the_learning_rates_rifle_and_hparams(cli, image_folder,
                                                                                         tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    result = cli("train", "--data", image_folder(), *TINY_TRAIN_ARGS, "--epochs", "3", "--method", "l2-sp",
                 "--rifle", "1", "--tensorboard", "--out", run)
    assert result.code == 0, result.err
    events = EventAccumulator(str(run)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/ce", "train/reg/l2sp", "train/reg/head", "val/top1", "lr/backbone", "lr/head",
            "head/norm", "events/rifle"} <= tags
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if "epoch" in r]
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in epochs]
    assert [e.value for e in events.Scalars("val/top1")] == pytest.approx([r["val/top1"] for r in epochs])
    assert [e.step for e in events.Scalars("events/rifle")] == [r["step"] for r in rows if r.get("event") == "rifle"]
    assert (run / "hparams").is_dir()  # the settings with the final scores
    assert "tensorboard" not in yaml.safe_load((run / "config.yaml").read_text())  # does not change the result


def test_compare_and_search_runs_write_tensorboard_events_too(cli, image_folder, tmp_path):
    root = image_folder()
    assert cli("compare", "--data", root, *TINY_TRAIN_ARGS, "--methods", "l2", "--seeds", "1", "--tensorboard",
               "--out", tmp_path / "cmp").code == 0
    assert list((tmp_path / "cmp" / "l2" / "seed0").glob("events.out.tfevents.*"))
    assert cli("search", "--data", root, *TINY_TRAIN_ARGS, "--method", "l2-sp", "--alpha-grid", "0.01",
               "--folds", "2", "--tensorboard", "--out", tmp_path / "s").code == 0
    assert list((tmp_path / "s" / "trials").rglob("events.out.tfevents.*"))
    assert list((tmp_path / "s" / "refit").rglob("events.out.tfevents.*"))


def test_without_a_method_train_fine_tunes_with_delta_and_says_where_its_alpha_comes_from(cli, image_folder,
                                                                                          tmp_path):
    """The default is the method that beat plain fine-tuning on the embedded default (README, Step 3)."""
    run = tmp_path / "run"
    result = cli("train", "--data", image_folder(), *TINY_TRAIN_ARGS, "--attention-epochs", "1",
                 "--attention-batch-size", "4", "--out", run)
    assert result.code == 0, result.err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "delta" and summary["alpha"] == 0.01
    assert summary["alpha_from"].startswith("the authors' default")  # printed unless --quiet
