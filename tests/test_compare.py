"""``deltatl compare``: methods x seeds, alpha chosen on the first seed's validation split, reuse of runs."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch

import deltatl.attention.estimate
import deltatl.run
from conftest import CLASS_COLOURS, TINY_TRAIN_ARGS, make_image, write_png
from deltatl.cli import main
from deltatl.compare import compare
from deltatl.config import TrainConfig

GRID = [0.001, 0.01]
SPECS = ["l2", "l2-sp", "delta+rifle1"]
SEEDS = [0, 1]


# --- the selection rule, with a fake trainer ---------------------------------------------------------

class FakeTrainer:
    """Returns a summary computed from the config; records every config it was given."""

    def __init__(self, val, test=lambda c: 50.0 + c.seed):
        self.val, self.test, self.configs = val, test, []

    def __call__(self, config: TrainConfig) -> dict:
        self.configs.append(config)
        return {"val_top1": self.val(config), "test_top1": self.test(config), "seconds": 2.0}

    def alphas(self, method: str, rifle: int = 0) -> set[float]:
        return {c.alpha for c in self.configs if c.method == method and c.rifle == rifle}


def run_compare(tmp_path, trainer, specs, grid=GRID, seeds=SEEDS):
    return {r["method"]: r for r in compare(TrainConfig(), specs, seeds, str(tmp_path / "cmp"), grid,
                                             train=trainer)}


def test_alpha_is_the_grid_value_with_the_best_first_seed_validation_accuracy_not_test_accuracy(tmp_path):
    trainer = FakeTrainer(val=lambda c: {0.001: 60.0, 0.01: 70.0, 0.1: 65.0}[c.alpha] if c.seed == 0 else 0.0,
                          test=lambda c: {0.001: 90.0, 0.01: 10.0, 0.1: 10.0}[c.alpha])
    rows = run_compare(tmp_path, trainer, ["l2-sp"], grid=[0.001, 0.01, 0.1])
    assert rows["l2-sp"]["alpha"] == 0.01
    assert {(c.alpha, c.seed) for c in trainer.configs} == {(0.001, 0), (0.01, 0), (0.1, 0), (0.01, 1)}
    selection = json.loads((tmp_path / "cmp" / "alpha_selection.json").read_text())
    assert selection["val_top1"] == {"l2-sp": {"0.001": 60.0, "0.01": 70.0, "0.1": 65.0}}


def test_a_tie_goes_to_the_earlier_grid_value(tmp_path):
    rows = run_compare(tmp_path, FakeTrainer(val=lambda c: 80.0), ["delta"], grid=[0.1, 0.001, 0.01])
    assert rows["delta"]["alpha"] == 0.1


def test_methods_without_alpha_ignore_the_grid(tmp_path):
    trainer = FakeTrainer(val=lambda c: 50.0)
    rows = run_compare(tmp_path, trainer, ["l2", "l2-fe"])
    assert rows["l2"]["alpha"] is None and rows["l2-fe"]["alpha"] is None
    assert len(trainer.configs) == 4


def test_a_rifle_variant_uses_the_alpha_chosen_for_its_base_method(tmp_path):
    trainer = FakeTrainer(val=lambda c: {0.001: 40.0, 0.01: 30.0}[c.alpha])
    rows = run_compare(tmp_path, trainer, ["delta", "delta+rifle1"])
    assert rows["delta"]["alpha"] == rows["delta+rifle1"]["alpha"] == 0.001
    assert trainer.alphas("delta", rifle=1) == {0.001}


def test_a_single_alpha_is_used_without_selection_runs(tmp_path):
    """Two compare processes may share a folder (evidence/fm30.sh): with one alpha given (found by
    `deltatl search`), a +rifle variant must not train its base method's seed 0 to choose it."""
    trainer = FakeTrainer(val=lambda c: 50.0)
    rows = run_compare(tmp_path, trainer, ["l2-sp+rifle3"], grid=[0.001])
    assert rows["l2-sp+rifle3"]["alpha"] == 0.001
    assert {(c.method, c.rifle, c.alpha) for c in trainer.configs} == {("l2-sp", 3, 0.001)}


def test_a_rifle_variant_whose_base_method_is_not_listed_still_gets_its_alpha_chosen_on_the_grid(tmp_path):
    # The selection depends only on alpha, so it does not matter whether it is made on delta's runs
    # or on delta+rifle1's own: 0.001 must win, not the default alpha (0.01).
    trainer = FakeTrainer(val=lambda c: {0.001: 40.0, 0.01: 30.0}.get(c.alpha, 0.0))
    rows = run_compare(tmp_path, trainer, ["delta+rifle1"], grid=[0.001, 0.01])
    assert trainer.alphas("delta", rifle=1) == {0.001}
    assert rows["delta+rifle1"]["alpha"] == 0.001
    selection = json.loads((tmp_path / "cmp" / "alpha_selection.json").read_text())["val_top1"]
    assert selection, "the alpha choice is not recorded"


def test_wise_ft_interpolates_the_comparisons_own_lp_ft_run_of_each_seed(tmp_path):
    trainer = FakeTrainer(val=lambda c: 50.0)
    run_compare(tmp_path, trainer, ["lp-ft", "wise-ft", "wise-ft+bss", "lp-ft+bss"], grid=[0.001])
    by = {(c.method, c.seed): c for c in trainer.configs}
    for seed in SEEDS:
        assert by["wise-ft", seed].fine_tuned == by["lp-ft", seed].out
        assert by["wise-ft+bss", seed].fine_tuned == by["lp-ft+bss", seed].out  # listed after it: trained by it
    alone = FakeTrainer(val=lambda c: 50.0)
    run_compare(tmp_path / "alone", alone, ["wise-ft"])
    assert all(c.fine_tuned is None for c in alone.configs)  # its own subfolder


# --- the real command on a tiny image folder ---------------------------------------------------------

@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One ``deltatl compare`` of l2, l2-sp and delta+rifle1 over 2 seeds and a 2-value alpha grid."""
    base = tmp_path_factory.mktemp("compare")
    data = base / "data"
    for label, cls in enumerate(("red", "green", "blue")):
        for split, count, offset in (("train", 8, 0), ("test", 3, 1000)):
            for i in range(count):
                write_png(data / split / cls / f"{i}.png", make_image(label, offset + i, CLASS_COLOURS[cls]))
    out = base / "cmp"
    tiny = [a for a in TINY_TRAIN_ARGS if a not in ("--epochs", "1")]
    argv = ["compare", "--data", str(data), *tiny, "--epochs", "2", "--methods", *SPECS, "--seeds", "2",
            "--alpha-grid", *map(str, GRID), "--attention-epochs", "1", "--attention-batches", "1",
            "--attention-batch-size", "4", "--attention-cache", str(base / "cache"), "--out", str(out)]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(previous)
    return {"out": out, "argv": argv}


def summaries(out: Path) -> list[dict]:
    """Summaries of the compared runs (not those of the L2-FE fits of the channel attention)."""
    found = [json.loads(p.read_text()) for p in sorted(out.rglob("summary.json"))]
    return [s for s in found if "config" in s]


def runs_of(out: Path, spec: str, alpha: str) -> list[dict]:
    """The per-seed summaries behind one row of results.csv, found by their recorded config."""
    method, _, rifle = spec.partition("+rifle")
    found = [s for s in summaries(out) if s["config"]["method"] == method
             and s["config"]["rifle"] == int(rifle or 0)
             and (alpha == "" or s["config"]["alpha"] == float(alpha))]
    return sorted(found, key=lambda s: s["config"]["seed"])


def csv_rows(out: Path) -> dict[str, dict]:
    with open(out / "results.csv", newline="") as f:
        return {row["method"]: row for row in csv.DictReader(f)}


def test_compare_writes_the_table_the_csv_and_the_alpha_selection(compared):
    out = compared["out"]
    assert (out / "results.md").is_file() and (out / "alpha_selection.json").is_file()
    table = (out / "results.md").read_text()
    for spec in SPECS:
        assert f"| {spec} |" in table
    assert "mean ± std over seeds 0, 1" in table
    assert list(csv_rows(out)) == SPECS
    assert all(row["runs"] == "2" for row in csv_rows(out).values())


def test_l2_sp_alpha_is_the_grid_value_with_the_best_seed_0_validation_accuracy(compared):
    out = compared["out"]
    grid_runs = {a: json.loads((out / "l2-sp" / f"alpha{a:g}" / "seed0" / "summary.json").read_text())
                 for a in GRID}
    assert all(s["config"]["alpha"] == a and s["config"]["seed"] == 0 for a, s in grid_runs.items())
    best = max(GRID, key=lambda a: grid_runs[a]["val_top1"])  # the first of ties
    assert float(csv_rows(out)["l2-sp"]["alpha"]) == best
    selection = json.loads((out / "alpha_selection.json").read_text())["val_top1"]
    assert selection["l2-sp"] == {f"{a:g}": grid_runs[a]["val_top1"] for a in GRID}
    assert {s["config"]["alpha"] for s in runs_of(out, "l2-sp", str(best))} == {best}
    assert [s["config"]["seed"] for s in runs_of(out, "l2-sp", str(best))] == SEEDS


def test_means_and_standard_deviations_are_those_of_the_per_seed_summaries(compared):
    out = compared["out"]
    for spec, row in csv_rows(out).items():
        runs = runs_of(out, spec, row["alpha"])
        assert [s["config"]["seed"] for s in runs] == SEEDS, spec
        test = [s["test_top1"] for s in runs]
        val = [s["val_top1"] for s in runs]
        assert float(row["test_mean"]) == pytest.approx(statistics.fmean(test), abs=1e-9), spec
        assert float(row["test_std"]) == pytest.approx(statistics.stdev(test), abs=1e-9), spec
        assert float(row["val_mean"]) == pytest.approx(statistics.fmean(val), abs=1e-9), spec
        assert float(row["val_std"]) == pytest.approx(statistics.stdev(val), abs=1e-9), spec


def test_rerunning_compare_reuses_every_run_and_prints_the_same_table(compared, cli, monkeypatch):
    out = compared["out"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    files = {name: (out / name).read_bytes() for name in ("results.md", "results.csv", "alpha_selection.json")}
    assert len(before) >= 2 + 2 + 1 + 2  # l2-sp grid (seed 0), l2, l2-sp seed 1, delta+rifle1

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(deltatl.run, "fit", no_training)
    monkeypatch.setattr(deltatl.attention.estimate, "fit", no_training)
    again = cli(*compared["argv"])
    assert again.code == 0, again.err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")} == before
    assert {name: (out / name).read_bytes() for name in files} == files
    assert again.out.startswith(files["results.md"].decode().split("\n\n")[0] + "\n")


def test_a_named_table_of_other_methods_reuses_the_runs_and_keeps_the_first_table(compared, cli, monkeypatch):
    out = compared["out"]
    first = (out / "results.md").read_bytes()
    monkeypatch.setattr(deltatl.run, "fit", lambda *a, **k: pytest.fail("a finished run was trained again"))
    argv = list(compared["argv"])
    methods = argv.index("--methods")
    argv[methods + 1:methods + 1 + len(SPECS)] = ["l2"]
    result = cli(*argv, "--table", "only-l2")
    assert result.code == 0, result.err
    assert (out / "results.md").read_bytes() == first
    table = (out / "results-only-l2.md").read_text()
    assert "| l2 |" in table and "delta" not in table and (out / "results-only-l2.csv").exists()
    assert "results-only-l2.md" in result.out


def test_every_method_is_paired_by_seed_with_each_baseline_and_a_rifle_spec_with_its_method(tmp_path):
    noise = {0: 0.0, 1: 1.0, 2: -1.0}
    test = {"l2": lambda c: 50.0 + c.seed, "l2-sp": lambda c: 51.0 + c.seed,
            "delta": lambda c: 52.0 + c.seed + noise[c.seed], "delta+rifle1": lambda c: 52.5 + c.seed + noise[c.seed]}
    trainer = FakeTrainer(val=lambda c: 70.0, test=lambda c: test[f"{c.method}+rifle{c.rifle}" if c.rifle else c.method](c))
    compare(TrainConfig(), ["l2", "l2-sp", "delta", "delta+rifle1"], [0, 1, 2], str(tmp_path / "cmp"), train=trainer)
    with open(tmp_path / "cmp" / "paired.csv") as f:
        rows = {(r["method"], r["minus"]): r for r in csv.DictReader(f)}
    assert set(rows) == {("l2", "l2-sp"), ("l2-sp", "l2"), ("delta", "l2"), ("delta", "l2-sp"),
                         ("delta+rifle1", "l2"), ("delta+rifle1", "l2-sp"), ("delta+rifle1", "delta")}
    # delta - l2 per seed: 2, 3, 1: mean 2, std 1, 95 % interval 2 -+ t(0.975, 2) / sqrt(3) = 2 -+ 2.484
    row = rows[("delta", "l2")]
    assert float(row["diff_mean"]) == pytest.approx(2.0) and float(row["diff_std"]) == pytest.approx(1.0)
    assert float(row["ci_low"]) == pytest.approx(2 - 4.302653 / 3 ** 0.5, abs=1e-5)
    assert float(row["ci_high"]) == pytest.approx(2 + 4.302653 / 3 ** 0.5, abs=1e-5)
    # the same seed's images on both sides: a constant offset has no spread
    rifle = rows[("delta+rifle1", "delta")]
    assert float(rifle["diff_mean"]) == pytest.approx(0.5) and float(rifle["ci_low"]) == pytest.approx(0.5)
    assert "| delta | l2 | 3 | +2.00 | 1.00 | [-0.48, +4.48] |" in (tmp_path / "cmp" / "results.md").read_text()


def test_a_composition_is_measured_against_its_parts_and_wise_ft_against_its_lp_ft():
    from deltatl.compare import references

    specs = ["l2", "l2-fe", "lp-ft", "wise-ft", "lp-ft+delta", "wise-ft+delta", "bss", "delta", "delta+bss",
             "delta+rifle3"]
    assert references("delta+bss", specs) == ["l2", "l2-fe", "delta", "bss"]
    assert references("wise-ft", specs) == ["l2", "l2-fe", "lp-ft"]
    assert references("wise-ft+delta", specs) == ["l2", "l2-fe", "wise-ft", "delta", "lp-ft+delta"]
    assert references("delta+rifle3", specs) == ["l2", "l2-fe", "delta"]
    assert references("l2", specs) == ["l2-fe"] and references("bss", ["bss"]) == []


def test_delta_runs_of_other_settings_share_the_folder_and_its_baselines_with_their_own_results(tmp_path):
    trainer = FakeTrainer(val=lambda c: 70.0)
    other = TrainConfig(delta_source_bn="batch", delta_reduction="relative")
    compare(other, ["l2", "delta"], [0, 1], str(tmp_path / "cmp"), train=trainer)
    compare(TrainConfig(), ["l2", "delta"], [0, 1], str(tmp_path / "cmp"), train=trainer)
    names = sorted(p.name for p in (tmp_path / "cmp").glob("results*.md"))
    assert names == ["results-source-bn-batch_reduction-relative.md", "results.md"]
    folders = {Path(c.out).relative_to(tmp_path / "cmp").parts[:2] for c in trainer.configs}
    # DELTA's folders name the term's settings, whatever the defaults are; l2's runs are shared
    assert folders == {("l2", "seed0"), ("l2", "seed1"), ("delta", "source-bn-running_reduction-sum"),
                       ("delta", "source-bn-batch_reduction-relative")}


def test_a_rifle_spec_of_a_baseline_method_is_paired_with_it_once():
    from deltatl.compare import paired_differences

    rows = paired_differences({"l2": [80.0, 81.0], "l2+rifle1": [80.5, 82.0]})
    assert [(r["method"], r["minus"]) for r in rows] == [("l2+rifle1", "l2")]
    assert rows[0]["diff_mean"] == pytest.approx(0.75)


def test_runs_with_rifles_switches_get_their_own_folder_and_share_the_baselines():
    from deltatl.compare import settings_tag

    assert settings_tag(TrainConfig(method="l2", rifle=3)) == ""  # the folders of earlier runs stay put
    assert settings_tag(TrainConfig(method="l2", rifle=3, rifle_cyclic_lr=True)) == "rifle-cyclic-lr"
    assert settings_tag(TrainConfig(method="delta", rifle=3, rifle_reset_momentum=True)) == \
        "source-bn-running_reduction-sum_rifle-reset-momentum"
    assert settings_tag(TrainConfig(method="l2", rifle_cyclic_lr=True)) == ""  # no RIFLE: the plain l2 run


def test_runs_another_process_trains_are_left_to_it_and_read_when_done(tmp_path):
    """Several processes may run one comparison: a busy run is skipped, the others go on, then it is read."""
    from deltatl.errors import RunInUse

    busy = {("l2", 0): 2}  # another process holds l2 seed 0 for this process's next two tries
    order = []

    def trainer(config: TrainConfig) -> dict:
        key = (config.method, config.seed)
        order.append(key)
        if busy.get(key):
            busy[key] -= 1
            raise RunInUse(f"another deltatl process is using {config.out}")
        return {"val_top1": 50.0, "test_top1": 60.0 + config.seed, "seconds": 1.0}

    rows = compare(TrainConfig(), ["l2", "l2-fe"], SEEDS, str(tmp_path / "cmp"), train=trainer, poll_seconds=0.01)
    # l2 seed 0 was skipped while the other runs went on, then tried again until free
    assert order == [("l2", 0), ("l2", 1), ("l2-fe", 0), ("l2-fe", 1), ("l2", 0), ("l2", 0)]
    assert rows[0]["tests"] == [60.0, 61.0] and rows[1]["tests"] == [60.0, 61.0]


def test_two_compare_processes_on_one_folder_share_the_runs_and_print_the_same_table(tmp_path):
    import os
    import subprocess
    import sys

    data = tmp_path / "data"
    for label, cls in enumerate(("red", "green", "blue")):
        for split, count, offset in (("train", 8, 0), ("test", 3, 1000)):
            for i in range(count):
                write_png(data / split / cls / f"{i}.png", make_image(label, offset + i, CLASS_COLOURS[cls]))
    argv = [sys.executable, "-m", "deltatl", "compare", "--data", str(data), *TINY_TRAIN_ARGS, "--epochs", "2",
            "--methods", "l2", "l2-fe", "--seeds", "3", "--poll", "0.2", "--out", str(tmp_path / "cmp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    both = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in both]
    assert [p.returncode for p in both] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert outputs[0][0] == outputs[1][0]  # the same table
    for run in (tmp_path / "cmp").glob("*/seed*"):  # each run trained once: two epochs, one row each
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 2, run
