"""``deltatl bench``: every section runs in its quickest mode on the tiny model and prints JSON lines
of the documented schema with sane values. No timing thresholds: the machine is shared."""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

from deltatl.bench import DEFAULT_METHODS, SECTIONS
from deltatl.cli import main

TINY = ["--model", "test_resnet", "--pretrained", "none", "--image-size", "32", "--batch-size", "4",
        "--device", "cpu"]
FAST = ["--quick", "--repeats", "2", "--min-sample-seconds", "0.01",
        "--batch-sizes", "2,4", "--image-sizes", "32,40",
        "--throughput-models", "test_resnet", "--throughput-sizes", "32", "--throughput-batch-size", "4",
        "--throughput-variants", "fp32,channels_last,bf16", "--throughput-repeats", "1",
        "--loader-workers", "0", "--loader-batches", "2",
        "--attention-layers", "last", "--naive-channels", "2", "--naive-full-max", "0", "--sweep-masks", "8,1000",
        "--sweep-repeats", "1"]
MACHINE_KEYS = {"torch", "device", "threads", "cpu", "cpu_count", "loadavg_1min_at_start"}


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def bench_lines(tmp_path_factory) -> tuple[list[dict], list[dict]]:
    """All sections once for the whole module; returns (stdout lines, --json-out lines)."""
    from conftest import FASHION_TEST_PER_CLASS, FASHION_TRAIN_PER_CLASS, fashion_arrays, write_idx

    base = tmp_path_factory.mktemp("bench")
    root = base / "fashion"
    root.mkdir()
    for prefix, per_class, offset in (("train", FASHION_TRAIN_PER_CLASS, 0), ("t10k", FASHION_TEST_PER_CLASS, 1)):
        images, labels = fashion_arrays(per_class, offset)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    out = base / "bench.jsonl"
    stdout = io.StringIO()
    previous = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(stdout):
            code = main(["bench", *TINY, *FAST, "--data", "fashion-mnist", "--data-root", str(root),
                         "--train-per-class", "4", "--json-out", str(out)])
    finally:
        torch.set_num_threads(previous)  # bench sets --threads for the process
    assert code == 0
    printed = [json.loads(line) for line in stdout.getvalue().splitlines() if line.strip()]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    return printed, written


def by(lines: list[dict], section: str, kind: str | None = None) -> list[dict]:
    return [r for r in lines if r["section"] == section and (kind is None or r["kind"] == kind)]


def test_every_line_has_the_schema_and_json_out_repeats_stdout(bench_lines):
    printed, written = bench_lines
    assert printed == written
    assert {r["section"] for r in printed} == set(SECTIONS)
    for row in printed:
        assert {"section", "kind", "setup", "machine", "loadavg_1min"} <= set(row)
        assert MACHINE_KEYS <= set(row["machine"])
        assert row["machine"]["device"] == "cpu" and row["machine"]["threads"] == 1


def test_step_ratios_and_floor(bench_lines):
    printed, _ = bench_lines
    (floor,) = by(printed, "step", "floor")
    assert floor["floor"] >= 1 and floor["floor_truncated"] >= 1
    assert all(positive(floor[k]) for k in ("train_step_ms", "source_forward_ms", "source_forward_truncated_ms"))
    steps = {r["method"]: r for r in by(printed, "step", "step")}
    assert set(steps) == set(DEFAULT_METHODS)
    assert steps["l2"]["ratio_vs_l2"] == 1.0
    for method, row in steps.items():
        assert positive(row["step_ms"]) and positive(row["ratio_vs_l2"]), method
        assert row["floor"] == floor["floor"] and len(row["times_ms"]) == 2
        assert ("ratio_over_floor" in row) == method.startswith("delta")
    assert positive(steps["delta"]["ratio_over_floor"])


def test_memory_is_exact_tensor_accounting(bench_lines):
    printed, _ = bench_lines
    memory = {r["method"]: r for r in by(printed, "memory", "memory")}
    assert set(memory) == set(DEFAULT_METHODS)
    assert memory["l2"]["peak_ratio_vs_l2"] == 1.0 and memory["l2"]["floor"] == 1.0
    for method, row in memory.items():
        assert positive(row["peak_mb"]) and positive(row["peak_ratio_vs_l2"]) and row["floor"] >= 1, method
        assert row["peak_mb"] == pytest.approx(row["static_mb"] + row["transient_mb"], abs=0.02)
    # Deterministic facts, not timings: no backbone gradients for l2-fe; a starting point or a
    # source network (weights and feature maps) to hold for l2-sp and DELTA.
    assert memory["l2-fe"]["peak_ratio_vs_l2"] < 1
    for method in ("l2-sp", "delta-noatt", "delta"):
        assert memory[method]["must_hold_mb"] > 0 and memory[method]["floor"] > 1
        assert memory[method]["peak_ratio_vs_l2"] > 1


def test_scaling_throughput_loader(bench_lines):
    printed, _ = bench_lines
    scaling = by(printed, "scaling", "scaling")
    configs = {(r["axis"], r["batch_size"], r["image_size"]) for r in scaling}
    assert configs == {("batch_size", 2, 32), ("batch_size", 4, 32), ("image_size", 4, 32), ("image_size", 4, 40)}
    assert {r["method"] for r in scaling} == {"l2", "delta"}
    for row in scaling:
        assert all(positive(row[k]) for k in ("step_ms", "ms_per_image", "images_per_s", "time_relative"))
        assert row["work_relative"] == pytest.approx(
            row["batch_size"] / (2 if row["axis"] == "batch_size" else 4)
            * (row["image_size"] / 32) ** 2, rel=1e-3)
        assert ("ratio_vs_l2" in row) == (row["method"] == "delta")
    throughput = by(printed, "throughput", "throughput")
    assert {(r["variant"], r["mode"]) for r in throughput} == {
        (v, m) for v in ("fp32", "channels_last", "bf16") for m in ("train", "inference")}
    assert all(positive(r["images_per_s"]) and positive(r["speedup_vs_fp32"]) for r in throughput)
    (loader,) = by(printed, "loader", "loader")
    assert loader["workers"] == 0 and positive(loader["epoch_s"]) and positive(loader["per_batch_over_l2_step"])


def test_attention_section(bench_lines):
    printed, _ = bench_lines
    (layer,) = by(printed, "attention", "layer")
    (total,) = by(printed, "attention", "total")
    sweep = by(printed, "attention", "masks_per_forward")
    assert positive(layer["speedup_exact"]) and positive(layer["speedup_first_order"])
    assert layer["max_abs_exact_minus_naive"] < 1e-4  # exact means exact, whatever the speed
    assert -1 <= layer["spearman_first_order"] <= 1 and 0 <= layer["top10_overlap_first_order"] <= 1
    assert 0 < layer["suffix_time_fraction"] <= 1 and layer["ideal_speedup_exact"] >= 1
    assert total["layers"] == [layer["layer"]] and positive(total["speedup_exact"])
    # 1000 covers every channel: the sweep keeps it as the single "all channels" value.
    assert [r["masks_per_forward"] for r in sweep] == [8, 1000]
    assert all(positive(r["exact_s"]) and r["max_abs_diff_vs_first"] < 1e-4 for r in sweep)


def test_bad_options_are_one_line_errors(cli):
    result = cli("bench", "--only", "step,nope")
    assert result.code == 2 and "unknown section(s) nope" in result.err
    result = cli("bench", "--methods", "l2,l3")
    assert result.code == 2 and "unknown method 'l3'" in result.err
