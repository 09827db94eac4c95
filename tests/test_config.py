"""Configuration: YAML files, command-line flags on top, validation."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from deltatl.cli import _config_from, build_parser
from deltatl.config import EMBEDDED_DELTA_ALPHA, OFFICIAL_ALPHA, RELATIVE_ALPHA, TrainConfig, dump_yaml, load_yaml, make_config, read_run_config
from deltatl.errors import DeltatlError


def write(tmp_path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def config_from_argv(*argv: str) -> TrainConfig:
    return _config_from(build_parser().parse_args(["train", *argv]))


def test_yaml_file_becomes_a_train_config(tmp_path):
    path = write(tmp_path, "data: my/folder\nmodel: test_resnet\nmethod: l2-fe\nepochs: 3\nlr: 0.05\n"
                           "train_per_class: 12\nhead_init: zero\ncheck_images: false\n")
    config = make_config(load_yaml(path), {})
    assert config == TrainConfig(data="my/folder", model="test_resnet", method="l2-fe", epochs=3, lr=0.05,
                                 train_per_class=12, head_init="zero", check_images=False)


def test_yaml_keys_may_use_dashes_or_underscores(tmp_path):
    path = write(tmp_path, "image-size: 64\nbatch_size: 8\nweight-decay: 0.001\nval_per_class: 2\n")
    config = make_config(load_yaml(path), {})
    assert (config.image_size, config.batch_size, config.weight_decay, config.val_per_class) == (64, 8, 0.001, 2)


def test_an_integer_is_accepted_where_a_float_is_expected(tmp_path):
    config = make_config(load_yaml(write(tmp_path, "lr: 1\nmomentum: 0\n")), {})
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.momentum == 0.0 and isinstance(config.momentum, float)


def test_an_empty_yaml_file_gives_the_defaults(tmp_path):
    assert make_config(load_yaml(write(tmp_path, "")), {}) == TrainConfig()


def test_an_unknown_key_is_rejected_by_name(tmp_path):
    path = write(tmp_path, "lr: 0.1\nlearning_rate: 0.1\n")
    with pytest.raises(DeltatlError, match="unknown setting.*learning_rate"):
        load_yaml(path)


@pytest.mark.parametrize("text, message", [
    ("epochs: ten\n", r"epochs must be int or None, got 'ten'"),
    ("epochs: 2.5\n", r"epochs must be int or None, got 2.5"),
    ("image-size: true\n", r"image-size must be int, got True"),
    ("lr: fast\n", r"lr must be float, got 'fast'"),
    ("check_images: 'no'\n", r"check-images must be bool, got 'no'"),
    ("model: 18\n", r"model must be str, got 18"),
    ("lr: [0.1, 0.01]\n", r"lr must be float"),
])
def test_a_value_of_the_wrong_type_is_rejected_with_a_clear_message(tmp_path, text, message):
    with pytest.raises(DeltatlError, match=message):
        make_config(load_yaml(write(tmp_path, text)), {})


def test_yaml_scientific_notation_such_as_1e_4_is_read_as_a_number(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-4` as the string '1e-4'; it is how everyone writes a weight decay.
    config = make_config(load_yaml(write(tmp_path, "weight-decay: 1e-4\nlr: 5e-3\n")), {})
    assert config.weight_decay == pytest.approx(1e-4)
    assert config.lr == pytest.approx(5e-3)


@pytest.mark.parametrize("text, message", [
    ("- lr\n- 0.1\n", "must hold a mapping"),
    ("lr: [0.1\n", "not valid YAML"),
])
def test_a_yaml_file_that_is_not_a_mapping_is_rejected(tmp_path, text, message):
    with pytest.raises(DeltatlError, match=message):
        load_yaml(write(tmp_path, text))


def test_a_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(DeltatlError, match="config file not found"):
        load_yaml(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("values, message", [
    ({"batch_size": 0}, "`batch_size` must be at least 1"),
    ({"image_size": 4}, "`image_size` must be at least 8"),
    ({"epochs": 2, "iters": 10}, "not both"),
    ({"epochs": 0}, "`epochs` must be at least 1"),
    ({"lr": -0.1}, "`lr` must be positive"),
    ({"val_fraction": 1.0}, "`val_fraction`"),
    ({"train_per_class": -1}, "`train_per_class`"),
    ({"alpha": float("nan")}, "`alpha` must be a finite number"),
])
def test_invalid_values_are_rejected_naming_the_setting(values, message):
    with pytest.raises(DeltatlError, match=message):
        make_config({}, values)


def test_command_line_flags_override_the_file_and_the_file_overrides_the_defaults(tmp_path):
    path = write(tmp_path, "lr: 0.05\nbatch-size: 8\nepochs: 3\nmethod: l2-fe\n")
    config = config_from_argv("--config", path, "--lr", "0.2", "--method", "l2")
    assert config.lr == 0.2
    assert config.method == "l2"
    assert config.batch_size == 8  # from the file: a flag that is not given does not override it
    assert config.epochs == 3
    assert config.momentum == TrainConfig().momentum  # neither: the default


def test_flags_without_a_file_override_the_defaults_only_where_given():
    config = config_from_argv("--lr", "0.3", "--no-check-images", "--train-per-class", "5")
    assert dataclasses.replace(TrainConfig(), lr=0.3, check_images=False, train_per_class=5) == config


def test_the_cli_uses_the_file_and_the_flag_in_a_real_run(tmp_path, image_folder, cli, tiny_train_args):
    data = image_folder(train=4, test=1)
    path = write(tmp_path, f"data: {data}\nlr: 0.05\nbatch-size: 2\nseed: 4\n")
    out = tmp_path / "run"
    # the tiny flags without --batch-size, which the file sets
    i = tiny_train_args.index("--batch-size")
    flags = tiny_train_args[:i] + tiny_train_args[i + 2:]
    result = cli("train", "--config", path, "--lr", "0.02", *flags, "--out", out)
    assert result.code == 0, result.err
    saved = read_run_config(str(out / "config.yaml"))
    assert saved["lr"] == 0.02
    assert saved["batch_size"] == 2
    assert saved["seed"] == 4
    assert saved["data"] == str(data)


def test_an_unknown_key_in_the_config_file_stops_the_cli_with_one_line(tmp_path, cli):
    path = write(tmp_path, "lr: 0.1\nlearning-rate: 0.1\n")
    result = cli("train", "--config", path, "--out", tmp_path / "run")
    assert result.code == 2
    assert result.err_lines == [f"deltatl: error: {path}: unknown setting(s) learning_rate"]
    assert not (tmp_path / "run").exists()


def test_result_fields_leave_out_device_workers_and_out():
    config = TrainConfig(device="cpu", workers=3, out="somewhere")
    fields = config.result_fields()
    assert not {"device", "workers", "out"} & set(fields)
    assert {"data", "data_root", "train_per_class", "val_per_class", "val_fraction", "image_size", "model",
            "pretrained", "checkpoint", "head_init", "method", "epochs", "iters", "batch_size", "lr", "momentum",
            "weight_decay", "schedule", "seed"} <= set(fields)
    assert fields == TrainConfig(device="cuda", workers=0, out=None).result_fields()
    assert fields != TrainConfig(lr=0.5).result_fields()


@pytest.mark.parametrize("method", ["l2", "delta"])
def test_the_saved_config_reads_back_as_the_same_run(tmp_path, method):
    config = TrainConfig(method=method, data="x", lr=0.003, weight_decay=1e-4, epochs=2, check_images=False)
    path = str(tmp_path / "config.yaml")
    dump_yaml(config, path)
    assert read_run_config(path) == config.result_fields()
    read = make_config(load_yaml(path), {})
    assert read.result_fields() == config.result_fields()
    # the file records the alpha the run used: a default alpha reads back as given (same run)
    assert read == (config if method == "l2" else dataclasses.replace(config, alpha=config.resolved_alpha()))
    assert yaml.safe_load(open(path))["weight_decay"] == 1e-4


@pytest.mark.parametrize("settings, alpha", [
    ({"method": "l2"}, None),
    ({"method": "l2-fe"}, None),
    ({"method": "l2-sp"}, OFFICIAL_ALPHA),  # the authors'
    ({"method": "delta"}, EMBEDDED_DELTA_ALPHA),  # the official term, calibrated for the embedded model
    ({"method": "delta-noatt"}, OFFICIAL_ALPHA),  # its cross-validation chose the authors' value
    ({"method": "delta", "model": "resnet50"}, OFFICIAL_ALPHA),  # any other model: the authors'
    ({"method": "delta", "delta_reduction": "mean"}, OFFICIAL_ALPHA),
    ({"method": "delta", "delta_reduction": "relative"}, RELATIVE_ALPHA),  # the relative term's own scale
    ({"method": "delta", "delta_reduction": "relative", "model": "resnet50"}, RELATIVE_ALPHA),
    ({"method": "delta", "alpha": 0.3}, 0.3),  # given: used as it is
    ({"method": "l2", "alpha": 0.3}, None),  # a method without alpha has none
])
def test_alpha_resolves_per_method_delta_reduction_and_model(settings, alpha):
    assert TrainConfig(**settings).resolved_alpha() == alpha


def test_the_defaults_for_delta_are_the_authors_term_and_the_alternatives_are_switches():
    config = TrainConfig(method="delta")
    assert (config.delta_reduction, config.delta_source_bn) == ("sum", "running")
    other = config_from_argv("--method", "delta", "--delta-reduction", "relative", "--delta-source-bn", "batch")
    assert (other.delta_reduction, other.delta_source_bn, other.resolved_alpha()) == ("relative", "batch",
                                                                                      RELATIVE_ALPHA)


def test_result_fields_hold_only_the_settings_the_method_uses_with_alpha_resolved():
    plain = TrainConfig(method="l2").result_fields()
    assert not {"alpha", "beta"} & set(plain)
    assert not [k for k in plain if k.startswith(("delta_", "attention_"))]
    noatt = TrainConfig(method="delta-noatt").result_fields()
    assert noatt["alpha"] == OFFICIAL_ALPHA and noatt["delta_source_bn"] == "running"
    assert not [k for k in noatt if k.startswith("attention_")]
    assert "attention_temperature" in TrainConfig(method="delta").result_fields()
    # so a run of l2 is the same run whatever DELTA's settings were on the command line
    assert TrainConfig(method="l2", alpha=5.0, delta_reduction="sum").result_fields() == plain


@pytest.mark.parametrize("flag", ["--alpha", "--beta"])
@pytest.mark.parametrize("value", ["-0.1", "nan", "inf"])
def test_negative_or_non_finite_alpha_and_beta_are_refused(flag, value):
    with pytest.raises(DeltatlError, match=f"`{flag[2:]}` must be a finite number"):
        config_from_argv(flag, value)


def test_data_loading_workers_default_to_none_on_the_cpu_and_to_the_usable_cpus_on_cuda(monkeypatch):
    import os

    import torch

    from deltatl.run import data_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    assert data_workers(None, torch.device("cpu")) == 0
    assert data_workers(None, torch.device("cuda")) == 8  # at most 8
    assert data_workers(None, torch.device("cuda"), processes_per_node=4) == 3  # the node's CPUs shared
    assert data_workers(None, torch.device("cuda"), processes_per_node=24) == 1
    assert data_workers(2, torch.device("cuda")) == 2 and data_workers(0, torch.device("cuda")) == 0
    assert "workers" not in TrainConfig(workers=3).result_fields()  # execution only: runs stay reusable


def test_settings_that_change_only_rounding_are_not_part_of_a_runs_identity():
    plain = TrainConfig(method="l2-sp").result_fields()
    for variant in (dict(l2sp_fused=False), dict(channels_last=False), dict(channels_last=True)):
        assert TrainConfig(method="l2-sp", **variant).result_fields() == plain, variant
    assert TrainConfig().l2sp_fused  # the fused L2-SP gradient is the default (BENCHMARKS.md)


def test_rifles_switches_are_not_part_of_a_run_without_rifle():
    assert TrainConfig(method="delta", rifle_cyclic_lr=True, rifle_reset_momentum=True).result_fields() == \
        TrainConfig(method="delta").result_fields()
    assert TrainConfig(method="delta", rifle=3, rifle_cyclic_lr=True).result_fields() != \
        TrainConfig(method="delta", rifle=3).result_fields()


def test_a_run_records_the_epochs_it_trains_so_a_new_default_never_reuses_an_old_run(tmp_path):
    from deltatl.run import _prepare_run_dir

    assert TrainConfig().result_fields()["epochs"] == TrainConfig.DEFAULT_EPOCHS
    assert TrainConfig(iters=5).result_fields()["epochs"] is None
    # a run written when the default was not recorded (epochs: null) and trained: not this run
    old = {**TrainConfig(data="x").result_fields(), "epochs": None}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(DeltatlError, match="differs in: epochs"):
        _prepare_run_dir(str(tmp_path), TrainConfig(data="x"), resume=True)


def test_a_composition_records_its_resolved_alpha_and_only_the_settings_it_uses():
    fields = TrainConfig(method="delta+bss").result_fields()
    assert fields["alpha"] == TrainConfig(method="delta").resolved_alpha()
    assert "delta_reduction" in fields
    assert "delta_reduction" not in TrainConfig(method="l2-sp+bss").result_fields()
