"""The paper presets under configs/: every file resolves to a valid TrainConfig with the paper's protocol,
one file per cell of Tables 1 and 2, each mapped to its command in docs/paper-tables.md; ``base:`` includes."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm

from deltatl.cli import _config_from, build_parser
from deltatl.config import TrainConfig, load_yaml, make_config
from deltatl.data import DATASETS
from deltatl.errors import DeltatlError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DOC = ROOT / "docs" / "paper-tables.md"
ALL = sorted(CONFIGS.rglob("*.yaml"))

DATASETS_OF = {"resnet101": ["mit-indoor67", "stanford-dogs", "caltech256-30", "caltech256-60", "cub200", "food101"],
               "inception-v3": ["mit-indoor67", "stanford-dogs", "caltech256-30"]}
METHODS_OF = {1: ["l2-fe", "l2", "l2-sp", "delta-noatt", "delta"], 2: ["l2", "l2-sp", "delta"]}
NETWORK = {"resnet101": dict(model="resnet101.tv_in1k", image_size=224, resize=256, lr=0.01),
           "inception-v3": dict(model="inception_v3.tv_in1k", image_size=299, resize=320, lr=0.001)}
CELLS = [(table, net, data, method) for table in (1, 2) for net, datasets in DATASETS_OF.items()
         for data in datasets for method in METHODS_OF[table]]


def resolve(path: Path) -> TrainConfig:
    return make_config(load_yaml(str(path)), {})


def cell_path(table: int, net: str, data: str, method: str) -> Path:
    return CONFIGS / f"table{table}" / net / data / f"{method}.yaml"


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(CONFIGS)) for p in ALL])
def test_every_config_file_resolves_to_a_valid_train_config(path):
    config = resolve(path)
    assert isinstance(config, TrainConfig)
    if path.name == "augment.yaml" or path.name.startswith("places365-"):
        return  # fragments, only ever used as a second base
    assert config.batch_size == 64 and config.momentum == 0.9 and config.beta == 0.01
    assert config.iters == 9000 and config.decay_at == 6000 and config.pretrained == "hub"
    assert timm.is_model(config.model)


def test_there_is_exactly_one_config_per_cell_of_tables_1_and_2():
    assert len(CELLS) == 6 * 5 + 3 * 5 + 6 * 3 + 3 * 3
    expected = {cell_path(*cell) for cell in CELLS}
    found = {p for p in ALL if p.relative_to(CONFIGS).parts[0] in ("table1", "table2")}
    assert found == expected


@pytest.mark.parametrize("table, net, data, method", CELLS)
def test_each_cell_holds_the_paper_protocol_for_its_network_dataset_and_method(table, net, data, method):
    config = resolve(cell_path(table, net, data, method))
    assert (config.data, config.method) == (data, method)
    for key, value in NETWORK[net].items():
        assert getattr(config, key) == value, key
    assert config.schedule == "step" and config.val_per_class == 0
    assert config.keep_aspect is config.ten_crop is (table == 2)
    assert config.alpha == (0.1 if data == "stanford-dogs" else 0.01)
    # the authors' DELTA term, not deltatl's defaults
    assert (config.delta_reduction, config.delta_source_bn) == ("sum", "running")
    assert (config.checkpoint is not None) is (data == "mit-indoor67")  # Places365 source weights
    assert config.aux_weight == 0 and config.rifle == 0
    assert (config.head_dropout, config.head_dropconnect, config.drop_path_rate, config.disturb_label) == (0, 0, 0, 0)


def test_the_cells_name_datasets_deltatl_knows():
    assert {resolve(cell_path(*cell)).data for cell in CELLS} <= set(DATASETS)


def test_figure_2_has_the_step_and_the_exponential_schedule_for_l2_sp_and_delta():
    for method in ("l2-sp", "delta"):
        step = resolve(CONFIGS / "figure2" / "resnet101" / "stanford-dogs" / f"{method}-step.yaml")
        exp = resolve(CONFIGS / "figure2" / "resnet101" / "stanford-dogs" / f"{method}-exp.yaml")
        assert step == resolve(cell_path(1, "resnet101", "stanford-dogs", method))
        assert exp == TrainConfig(**{**step.__dict__, "schedule": "exp"})


def test_the_doc_maps_every_cell_to_its_command():
    text = DOC.read_text()
    for cell in CELLS:
        path = cell_path(*cell).relative_to(ROOT)
        assert f"deltatl train --config {path} --data-root DIR" in text, path
    for path in (CONFIGS / "figure2").rglob("*.yaml"):
        assert str(path.relative_to(ROOT)) in text


def test_command_line_flags_override_a_preset():
    path = cell_path(1, "resnet101", "caltech256-30", "delta")
    args = build_parser().parse_args(["train", "--config", str(path), "--data-root", "/data", "--alpha", "0.001",
                                      "--iters", "90", "--decay-at", "60"])
    config = _config_from(args)
    assert (config.alpha, config.iters, config.decay_at, config.data_root) == (0.001, 90, 60, "/data")
    assert config.model == "resnet101.tv_in1k" and config.data == "caltech256-30"


# --- base: includes ----------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_bases_are_merged_in_order_then_overridden_by_the_file(tmp_path):
    write(tmp_path / "base" / "a.yaml", "lr: 0.1\nbatch-size: 8\nseed: 1\n")
    write(tmp_path / "base" / "b.yaml", "base: a.yaml\nlr: 0.2\n")  # relative to b.yaml
    write(tmp_path / "base" / "c.yaml", "seed: 3\nmomentum: 0.5\n")
    cell = write(tmp_path / "cells" / "x.yaml", "base: [../base/b.yaml, ../base/c.yaml]\nmomentum: 0.7\n")
    assert load_yaml(str(cell)) == {"lr": 0.2, "batch_size": 8, "seed": 3, "momentum": 0.7}


def test_a_base_that_includes_itself_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(DeltatlError, match="includes itself"):
        load_yaml(str(tmp_path / "a.yaml"))


@pytest.mark.parametrize("text, fragment", [
    ("base: missing.yaml\n", "config file not found"),
    ("base: 3\n", "base must be"),
    ("base: ok.yaml\nnot-a-setting: 1\n", "unknown setting"),
])
def test_bad_bases_are_one_line_errors(tmp_path, text, fragment):
    write(tmp_path / "ok.yaml", "lr: 0.1\n")
    with pytest.raises(DeltatlError, match=fragment):
        load_yaml(str(write(tmp_path / "cell.yaml", text)))


def test_an_unknown_setting_in_a_base_names_the_base_file(tmp_path):
    write(tmp_path / "bad.yaml", "learning-rate: 0.1\n")
    with pytest.raises(DeltatlError, match="bad.yaml: unknown setting"):
        load_yaml(str(write(tmp_path / "cell.yaml", "base: bad.yaml\n")))
