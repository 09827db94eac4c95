"""The analyses' numbers: on tiny runs of the tiny model, and on synthetic inputs with known answers."""
from __future__ import annotations

import copy
import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import CLASS_COLOURS, TINY_TRAIN_ARGS, make_image, write_png
from deltatl.analysis import load_run, load_runs
from deltatl.analysis.activations import (SOURCE, activation_analysis, channel_strength, collect_features,
                                          default_map_layer, load_networks, low_activation_channels,
                                          minmax_normalize, upsample)
from deltatl.analysis.attention import attention_analysis, run_weights, spearman, weight_stats
from deltatl.analysis.curves import curve_rows, learning_curves
from deltatl.analysis.distance import (backbone_stages, distance_analysis, filter_distances, share_farther,
                                       sorted_curve, stage_distances)
from deltatl.analysis.keypoints import (keypoint_activation, keypoint_analysis, keypoints_source, match_keypoints,
                                        sample_at_points, transform_points)
from deltatl.analysis.rifle import around_events, rifle_analysis
from deltatl.analysis.runs import label_runs, map_layers, pick_spread, sample_images, start_model, trained_model
from deltatl.cli import main
from deltatl.errors import DeltatlError
from deltatl.models import create_model

CLASSES = ("red", "green", "blue")
ATTENTION = ["--attention-epochs", "1", "--attention-batches", "1", "--attention-batch-size", "4"]
# Runs of the tiny model, each (name, flags). l2-fe freezes the backbone: an untrained copy of the start.
RUNS = {
    "l2": ["--method", "l2", "--epochs", "2"],
    "l2-fe": ["--method", "l2-fe", "--epochs", "2"],
    "l2-sp": ["--method", "l2-sp", "--epochs", "2", "--alpha", "0.01"],
    "delta": ["--method", "delta", "--epochs", "2", "--alpha", "0.001", *ATTENTION],
    "rifle": ["--method", "l2", "--epochs", "4", "--rifle", "1"],
}


def make_data(root: Path, train: int = 8, test: int = 3) -> Path:
    for label, cls in enumerate(CLASSES):
        for split, count, offset in (("train", train, 0), ("test", test, 1000)):
            for i in range(count):
                write_png(root / split / cls / f"{cls}_{i}.png", make_image(label, offset + i, CLASS_COLOURS[cls]))
    return root


def make_cub_parts(root: Path, data: Path, parts: tuple[str, ...] = ("beak", "tail")) -> Path:
    """A folder in CUB's format annotating the test images of ``data``: part 1 at the image centre,
    part 2 at the top-left corner (invisible on every other image)."""
    (root / "parts").mkdir(parents=True)
    names = sorted(str(p.relative_to(data / "test")) for p in (data / "test").rglob("*.png"))
    (root / "images.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(names, 1)))
    (root / "parts" / "parts.txt").write_text("".join(f"{i} {p}\n" for i, p in enumerate(parts, 1)))
    lines = []
    for i, _ in enumerate(names, 1):
        lines.append(f"{i} 1 12.0 12.0 1\n")
        lines.append(f"{i} 2 2.0 2.0 {i % 2}\n" if i % 2 else f"{i} 2 0 0 0\n")
    (root / "parts" / "part_locs.txt").write_text("".join(lines))
    return root


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """Finished tiny runs of several methods on one image folder (read-only for the tests)."""
    base = tmp_path_factory.mktemp("analysis")
    data = make_data(base / "data")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = {}
    try:
        for name, flags in RUNS.items():
            out = base / "runs" / name
            code = main(["train", "--data", str(data), *TINY_TRAIN_ARGS, "--lr", "0.05", *flags,
                         "--attention-cache", str(base / "cache"), "--out", str(out)])
            assert code == 0, name
            runs[name] = out
    finally:
        torch.set_num_threads(previous)
    runs["data"] = data
    return runs


# --- runs -------------------------------------------------------------------------------------------

def test_a_folder_that_is_not_a_run_is_a_one_line_error_naming_runs_below_it(tiny_runs, tmp_path):
    with pytest.raises(DeltatlError, match="not a run directory"):
        load_run(str(tmp_path))
    with pytest.raises(DeltatlError, match="run directories below it"):
        load_run(str(tiny_runs["l2"].parent))
    with pytest.raises(DeltatlError, match="no such folder"):
        load_run(str(tmp_path / "missing"))


def test_a_metrics_row_still_being_written_is_left_out_and_a_damaged_one_is_an_error(tiny_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["l2"], run)
    complete = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(complete + '{"epoch": 3, "st')
    assert load_run(str(run)).metrics == load_run(str(tiny_runs["l2"])).metrics
    (run / "metrics.jsonl").write_text('{"epoch": 3, "st\n' + complete)
    with pytest.raises(DeltatlError, match="metrics.jsonl:1 is not a JSON line"):
        load_run(str(run))


def test_labels_are_the_method_specs_and_grow_only_to_stay_unique(tiny_runs):
    runs = load_runs([str(tiny_runs[n]) for n in ("l2", "l2-sp", "rifle")])
    assert [r.label for r in runs] == ["l2", "l2-sp", "l2+rifle1"]
    twin = copy.deepcopy(runs[0])
    twin.config["seed"] = 7
    both = [runs[0], twin]
    label_runs(both)
    assert [r.label for r in both] == ["l2 s0", "l2 s7"]


def test_pick_spread_visits_every_class_before_repeating_one():
    targets = [0] * 10 + [1] * 3 + [2] * 5
    picked = pick_spread(targets, 6, seed=1)
    assert len(set(picked)) == 6
    assert sorted(targets[i] for i in picked[:3]) == [0, 1, 2]
    assert sorted(targets[i] for i in picked[3:6]) == [0, 1, 2]
    assert pick_spread(targets, 6, seed=1) == picked
    assert len(pick_spread([0, 1], 5, seed=0)) == 2


# --- learning curves --------------------------------------------------------------------------------

def test_learning_curve_csv_equals_metrics_jsonl(tiny_runs, tmp_path):
    runs = load_runs([str(tiny_runs["l2"]), str(tiny_runs["rifle"])])
    result = learning_curves(runs, str(tmp_path))
    assert {p.name for p in tmp_path.iterdir()} == {"learning_curves.csv", "learning_curves.png",
                                                    "learning_curves.svg"}
    with open(tmp_path / "learning_curves.csv") as f:
        table = list(csv.DictReader(f))
    for run in runs:
        expected = [json.loads(line) for line in (Path(run.path) / "metrics.jsonl").read_text().splitlines()]
        got = [row for row in table if row["run"] == run.label]
        assert len(got) == len(expected)
        for row, want in zip(got, expected):
            assert {k for k, v in row.items() if v != ""} == {"run", *want}
            for key, value in want.items():
                assert (float(row[key]) if isinstance(value, (int, float)) else row[key]) == value, key
    assert any(row.get("event") == "rifle" for row in table)
    assert result.figures == ["learning_curves"] and result.data_files == ["learning_curves.csv"]
    assert curve_rows(runs)[0] == {"run": "l2", **runs[0].metrics[0]}


def test_metrics_rows_log_the_head_weight_norm(tiny_runs):
    model, _ = trained_model(load_run(str(tiny_runs["l2"])))
    rows = load_run(str(tiny_runs["l2"])).eval_rows
    assert all(row["head/norm"] > 0 for row in rows)
    assert rows[-1]["head/norm"] == pytest.approx(model.fc.weight.norm().item(), rel=1e-6)


# --- distance from the start ------------------------------------------------------------------------

def test_distance_of_an_untrained_copy_from_its_start_is_zero():
    start = create_model("test_resnet", 3, pretrained="none")
    distances = filter_distances(start, copy.deepcopy(start))
    convs = [n for n, m in start.named_modules() if isinstance(m, nn.Conv2d)]
    assert list(distances) == convs
    assert all(np.all(d == 0) for d in distances.values())
    assert [len(d) for d in distances.values()] == [start.get_submodule(n).out_channels for n in convs]


def test_filter_distance_is_the_euclidean_norm_of_each_flattened_filter_change():
    start = create_model("test_resnet", 3, pretrained="none")
    end = copy.deepcopy(start)
    with torch.no_grad():
        end.get_submodule("layer1.0.conv1").weight[5] += 0.5  # 32 x 3 x 3 = 288 numbers
        end.get_submodule("layer1.0.conv1").weight[7, 0, 0, 0] -= 3.0
    d = filter_distances(start, end, ["layer1.0.conv1"])["layer1.0.conv1"]
    expected = np.zeros(32)
    expected[5], expected[7] = 0.5 * math.sqrt(288), 3.0
    np.testing.assert_allclose(d, expected, rtol=1e-6, atol=1e-6)


def test_stages_cut_the_convolutions_at_the_tapped_layers_and_cover_each_once():
    model = create_model("test_resnet", 3, pretrained="none")
    taps = ["layer1.0.conv2", "layer2.0.downsample.1", "layer3.0.downsample.1", "layer4.0.downsample.1"]
    stages = backbone_stages(model, taps, 32)
    assert [s.name for s in stages] == ["stage 1: conv1–layer1", "stage 2: layer2", "stage 3: layer3",
                                        "stage 4: layer4"]
    every = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(n for s in stages for n in s.layers) == sorted(every)
    assert [s.layers[-1] for s in stages] == taps


def test_sorted_curve_decreases_keeps_the_far_filters_and_share_farther_compares_filter_by_filter():
    values = np.arange(1000, dtype=float)
    ranks, curve = sorted_curve(values, points=50, keep_first=10)
    assert list(ranks[:10]) == list(range(10)) and ranks[-1] == 999
    assert np.all(np.diff(curve) <= 0) and curve[0] == 999 and curve[-1] == 0
    assert share_farther(np.array([2.0, 1.0, 3.0, 0.0]), np.array([1.0, 1.0, 2.0, 1.0])) == 0.5


def test_an_l2_fe_run_has_every_filter_at_its_start_and_l2_moves_them(tiny_runs, tmp_path):
    runs = load_runs([str(tiny_runs["l2-sp"]), str(tiny_runs["l2-fe"]), str(tiny_runs["l2"])])
    result = distance_analysis(runs, str(tmp_path), progress=False)
    summary = json.loads((tmp_path / "distance_summary.json").read_text())
    assert summary["reference"] == "l2-sp" and len(summary["stages"]) == 4
    for stats in summary["runs"]["l2-fe"].values():
        assert stats["max"] == 0 and stats["zero"] == 1.0
        assert stats["share_farther_than_reference"] == 0.0
    assert all(s["median"] > 0 for s in summary["runs"]["l2"].values())
    assert {"distance.png", "distance.svg", "distance_curves.csv"} <= {p.name for p in tmp_path.iterdir()}
    assert result.tables and result.tables[0].header[0] == "run"


def test_the_rebuilt_start_is_the_network_the_run_began_with(tiny_runs):
    """An l2-fe run changes only the head: its backbone equals the rebuilt start bit for bit."""
    run = load_run(str(tiny_runs["l2-fe"]))
    trained, _ = trained_model(run)
    start = start_model(run, 3)
    for (name, a), (_, b) in zip(start.named_parameters(), trained.named_parameters()):
        if not name.startswith("fc."):
            assert torch.equal(a, b), name


# --- activation maps --------------------------------------------------------------------------------

def test_min_max_normalised_maps_are_bounded_by_zero_and_one_and_reach_both():
    torch.manual_seed(0)
    maps = torch.randn(4, 6, 7, 5) * 100 + 30
    maps[0, 0] = 3.25  # a constant map
    out = minmax_normalize(maps)
    assert out.shape == maps.shape
    assert out.min() >= 0 and out.max() <= 1
    flat = out.flatten(2)
    varying = torch.ones(4, 6, dtype=torch.bool)
    varying[0, 0] = False
    assert torch.all(flat.amin(2)[varying] == 0) and torch.all(flat.amax(2)[varying] == 1)
    assert torch.all(out[0, 0] == 0)
    # Affine-invariant: a positive scale and a shift change nothing.
    torch.testing.assert_close(minmax_normalize(maps * 3 + 7), out, atol=1e-5, rtol=0)


def test_weak_channels_are_the_lowest_mean_absolute_activation_skipping_constant_ones():
    maps = torch.ones(2, 4, 3, 3)
    maps[:, 0] = 0.0  # constant (dead): skipped
    maps[:, 1] *= 0.1
    maps[0, 1, 0, 0] = 0.2
    maps[:, 2] *= -5.0
    maps[1, 2, 1, 1] = -4.0
    maps[:, 3] *= 2.0
    maps[0, 3, 2, 2] = 1.0
    assert channel_strength(maps)[2] > channel_strength(maps)[3] > channel_strength(maps)[1]
    assert low_activation_channels(maps, 2) == [1, 3]


def test_default_map_layer_is_the_deepest_with_maps_at_least_eight_wide():
    shapes = {"a": (16, 24, 24), "b": (40, 12, 12), "c": (112, 6, 6)}
    assert default_map_layer(shapes) == "b"
    assert default_map_layer({"c": (1, 4, 4), "d": (1, 2, 2)}) == "c"


def test_activation_maps_of_tiny_runs(tiny_runs, tmp_path):
    runs = load_runs([str(tiny_runs[n]) for n in ("l2", "l2-sp", "delta")])
    networks = load_networks(runs, progress=False)
    assert networks.layers == map_layers(networks.source, runs[0])
    images = sample_images(runs[0], 6, seed=0)
    assert images.tensors.shape == (6, 3, 32, 32) and images.pictures.shape == (6, 32, 32, 3)
    assert 0 <= images.pictures.min() and images.pictures.max() <= 1
    assert sorted(set(images.targets)) == [0, 1, 2]
    sample = collect_features(networks, images, progress=False)
    assert list(sample.outputs) == [SOURCE, "l2", "l2-sp", "delta"]
    result = activation_analysis(runs, str(tmp_path), networks, sample, filters=2, images=2)
    data = json.loads((tmp_path / "activation_maps.json").read_text())
    assert data["layer"] == "layer1.0.conv2" and len(data["channels"]) == 2
    assert len(data["maps"]) == 4  # 2 channels x 2 images
    for entry in data["maps"]:
        for grid in entry["normalised"].values():
            values = np.array(grid)
            assert values.shape == (8, 8) and values.min() >= 0 and values.max() <= 1
    for channel in data["channels"]:
        assert channel["relative_to_source"][SOURCE] == pytest.approx(1.0)
    # The weakest source channels, in order.
    strength = channel_strength(sample.outputs[SOURCE]["layer1.0.conv2"])
    assert [c["channel"] for c in data["channels"]] == low_activation_channels(
        sample.outputs[SOURCE]["layer1.0.conv2"], 2)
    assert strength[data["channels"][0]["channel"]] <= strength[data["channels"][1]["channel"]]
    assert result.figures == ["activation_maps"]
    assert (tmp_path / "activation_maps.png").stat().st_size > 1000
    with pytest.raises(DeltatlError, match="not a tapped layer"):
        activation_analysis(runs, str(tmp_path), networks, sample, layer="fc")


def test_upsample_keeps_cell_values_at_cell_centres():
    maps = torch.arange(4.0).reshape(1, 2, 2)
    big = upsample(maps, (4, 4))
    # Cell (i, j) of a 2x2 map over 4x4 pixels is centred between pixels 2i and 2i+1.
    torch.testing.assert_close(big[0, 0, 0], torch.tensor(0.0))
    torch.testing.assert_close(big[0, 3, 3], torch.tensor(3.0))


# --- keypoints ----------------------------------------------------------------------------------------

def test_keypoint_activation_reads_a_known_peak():
    maps = torch.zeros(3, 4, 4)
    maps[:, 1, 2] = 5.0  # the peak: row 1, column 2 of a 4x4 map over a 32x32 input
    maps[1] *= 2.0  # another scale per channel: normalisation removes it
    # Cell centres lie at (j + 0.5) * 8 pixels: the peak cell's centre is x = 20, y = 12.
    points = torch.tensor([[20.0, 12.0], [4.0, 28.0], [24.0, 12.0], [20.0, 16.0]])
    values = keypoint_activation(maps, points, (32, 32))
    torch.testing.assert_close(values, torch.tensor([1.0, 0.0, 0.5, 0.5]))
    torch.testing.assert_close(sample_at_points(maps, points[:1], (32, 32)), torch.tensor([[5.0], [10.0], [5.0]]))


def test_keypoints_follow_the_square_resize_and_the_centre_crop():
    # A 200 x 100 image resized to 64 x 64 and centre-cropped to 56 (offset 4).
    points = np.array([[100.0, 50.0], [0.0, 0.0], [200.0, 100.0]])
    np.testing.assert_allclose(transform_points(points, (200, 100), 64, 56),
                               [[28.0, 28.0], [-4.0, -4.0], [60.0, 60.0]])
    # Keeping the aspect ratio: 128 x 64, then the 56 crop starts at x = 36, y = 4.
    np.testing.assert_allclose(transform_points(points, (200, 100), 64, 56, keep_aspect=True),
                               [[28.0, 28.0], [-36.0, -4.0], [92.0, 60.0]])


def test_keypoint_analysis_on_tiny_runs_with_cub_format_parts(tiny_runs, tmp_path):
    parts_root = make_cub_parts(tmp_path / "cub", tiny_runs["data"])
    runs = load_runs([str(tiny_runs["l2"]), str(tiny_runs["delta"])])
    locations = keypoints_source(runs[0], str(parts_root))
    assert locations is not None and locations.parts == ["beak", "tail"]
    test_ids = (Path(runs[0].path) / "splits" / "test.txt").read_text().split()[::2]
    assert len(match_keypoints(test_ids, locations)) == len(test_ids) == 9
    networks = load_networks(runs, progress=False)
    result = keypoint_analysis(runs, str(tmp_path / "out"), networks, locations, layer="layer1.0.conv2",
                               count=0, progress=False)
    data = json.loads((tmp_path / "out" / "keypoints.json").read_text())
    assert data["images"] == 9 and data["visible_parts"] == [9, 5]
    for per_network in data["mean_per_part"].values():
        assert set(per_network) == {SOURCE, "l2", "delta"}
        assert all(0 <= v <= 1 for v in per_network.values())
    for per_network in data["mean_sum_per_image"].values():
        assert all(0 <= v <= 2 for v in per_network.values())
    assert result.figures == ["keypoints"] and len(result.tables) == 2
    assert keypoints_source(runs[0], None) is None  # an image folder has no annotations of its own


# --- channel attention --------------------------------------------------------------------------------

def test_weight_stats_of_uniform_and_peaked_weights():
    uniform = weight_stats(torch.full((10,), 0.1))
    assert uniform["max_cw"] == pytest.approx(1.0) and uniform["effective_share"] == pytest.approx(1.0)
    peaked = torch.full((10,), 0.05)
    peaked[3] = 0.55
    stats = weight_stats(peaked)
    assert stats["favoured"][0] == 3 and stats["max_cw"] == pytest.approx(5.5)
    assert stats["top10pct_share"] == pytest.approx(0.55) and stats["effective_share"] < 1


def test_spearman_is_one_for_monotone_and_minus_one_for_reversed():
    a = [0.1, 5.0, 2.0, 3.0]
    assert spearman(a, [1, 4, 2, 3]) == pytest.approx(1.0)
    assert spearman(a, [4, 1, 3, 2]) == pytest.approx(-1.0)
    assert math.isnan(spearman(a, [1, 1, 1, 1]))


def test_attention_analysis_of_a_delta_run(tiny_runs, tmp_path):
    runs = load_runs([str(tiny_runs["l2"]), str(tiny_runs["delta"])])
    weights = run_weights(runs[1])
    assert all(abs(float(w.sum()) - 1) < 1e-5 for w in weights.values())
    strength = {name: torch.rand(len(w)) for name, w in weights.items()}
    result = attention_analysis(runs, str(tmp_path), strength)
    data = json.loads((tmp_path / "attention.json").read_text())
    assert list(data["runs"]) == ["delta"] and data["layers"] == list(weights)
    assert set(data["spearman_with_source_activation"]["delta"]) == set(weights)
    assert len(result.tables[0].rows) == len(weights)
    with pytest.raises(DeltatlError, match="attention.json"):
        attention_analysis(runs[:1], str(tmp_path))


# --- RIFLE ----------------------------------------------------------------------------------------------

def test_around_events_picks_the_evaluations_before_at_and_after_each_reinitialisation():
    rows = [{"step": 4, "val/top1": 50.0, "head/norm": 2.0}, {"step": 8, "event": "rifle"},
            {"step": 8, "val/top1": 10.0, "head/norm": 0.5}, {"step": 12, "val/top1": 60.0, "head/norm": 1.0}]
    (event,) = around_events(rows)
    assert event["step"] == 8 and event["before_step"] == 4 and event["after_step"] == 12
    assert (event["val/top1_before"], event["val/top1_at"], event["val/top1_after"]) == (50.0, 10.0, 60.0)
    assert event["head/norm_at"] == 0.5 and event["train/ce_at"] is None


def test_rifle_analysis_of_a_tiny_rifle_run(tiny_runs, tmp_path):
    runs = load_runs([str(tiny_runs["rifle"]), str(tiny_runs["l2"])])
    result = rifle_analysis(runs, str(tmp_path))
    with open(tmp_path / "rifle.csv") as f:
        (row,) = list(csv.DictReader(f))
    # 18 images, batch 4: 4 steps per epoch, 4 epochs, one re-initialisation after epoch 2.
    assert row["step"] == "8" and row["before_step"] == "4" and row["after_step"] == "12"
    assert float(row["head/norm_at"]) > 0
    assert result.figures == ["rifle"]
    with pytest.raises(DeltatlError, match="RIFLE"):
        rifle_analysis(runs[1:], str(tmp_path))
