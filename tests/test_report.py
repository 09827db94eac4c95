"""``deltatl report``: one self-contained HTML page with every figure that applies, and clear errors."""
from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import pytest
import yaml

from deltatl.analysis import load_runs
from deltatl.cli import main
from deltatl.errors import DeltatlError
from deltatl.report import build_report, results_table
from conftest import TINY_TRAIN_ARGS
from test_analysis import make_cub_parts, tiny_runs  # noqa: F401  (tiny_runs is a fixture)

EVERY_RUN = ("l2", "l2-fe", "l2-sp", "delta", "rifle")
FIGURES = ("learning_curves", "distance", "activation_maps", "keypoints", "delta_term", "attention", "rifle")


@pytest.fixture(scope="module")
def report(tiny_runs, tmp_path_factory):  # noqa: F811
    """A report of every tiny run, with CUB-format part annotations for the keypoint analysis."""
    base = tmp_path_factory.mktemp("report")
    parts = make_cub_parts(base / "cub", tiny_runs["data"])
    out = base / "report"
    page = build_report([str(tiny_runs[n]) for n in EVERY_RUN], str(out), keypoints=str(parts), filters=2,
                        images=2, sample=6, progress=False)
    return {"out": out, "page": Path(page), "html": Path(page).read_text()}


def test_the_report_has_every_figure_embedded_as_png(report):
    html, out = report["html"], report["out"]
    for stem in FIGURES:
        assert (out / f"{stem}.png").is_file() and (out / f"{stem}.svg").is_file(), stem
        match = re.search(rf'<figure id="fig-{stem}"><img alt="[^"]*" src="data:image/png;base64,([^"]+)"', html)
        assert match, stem
        assert base64.b64decode(match.group(1)) == (out / f"{stem}.png").read_bytes()
    assert "Not shown" not in html


def test_the_report_is_self_contained(report):
    html = report["html"]
    assert not re.search(r"(?i)\b(https?|ftp):", html)
    assert not re.search(r"(?i)<(script|link|iframe|object|embed)\b", html)
    assert not re.search(r"(?i)url\(", html)
    sources = re.findall(r'(?i)\b(?:src|href)="([^"]*)"', html)
    assert sources and all(s.startswith(("data:", "#")) for s in sources)
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")


def test_the_report_writes_the_numbers_and_the_results_table(report, tiny_runs):  # noqa: F811
    out, html = report["out"], report["html"]
    for name in ("learning_curves.csv", "distance_curves.csv", "distance_summary.json", "activation_maps.json",
                 "keypoints.json", "delta_term.csv", "attention.json", "rifle.csv", "results.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    runs = load_runs([str(tiny_runs[n]) for n in EVERY_RUN])
    for row in results_table(runs).rows:
        assert f"<td>{row[0]}</td>" in html
        assert f"<td>{row[6]}</td>" in html  # test top-1


def test_an_analysis_that_cannot_run_is_listed_and_the_others_still_run(tiny_runs, tmp_path):  # noqa: F811
    moved = tmp_path / "l2-moved"
    shutil.copytree(tiny_runs["l2"], moved)
    config = yaml.safe_load((moved / "config.yaml").read_text())
    config["data"] = str(tmp_path / "data-that-moved")
    (moved / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    page = Path(build_report([str(moved)], str(tmp_path / "out"), progress=False)).read_text()
    assert 'id="fig-learning_curves"' in page and 'id="fig-distance"' in page
    assert "Not shown" in page and "Activation maps" in page and "data-that-moved" in page


def test_report_cli_writes_the_page_and_names_it(cli, tiny_runs, tmp_path):  # noqa: F811
    result = cli("report", tiny_runs["l2"], tiny_runs["l2-sp"], "--out", tmp_path / "r", "--quiet", "--sample", "4")
    assert result.code == 0, result.err
    assert "index.html" in result.out and (tmp_path / "r" / "index.html").is_file()


@pytest.mark.parametrize("make_args, fragment", [
    (lambda runs, tmp: [tmp / "nothing-here"], "is not a run directory"),
    (lambda runs, tmp: [runs["l2"].parent], "run directories below it"),
    (lambda runs, tmp: [runs["l2"], "--out", runs["l2"] / "report"], "lies inside the run directory"),
    (lambda runs, tmp: [runs["l2"], "--filters", "0"], "--filters must be at least 1"),
])
def test_report_cli_errors_are_one_line_and_exit_2(cli, tiny_runs, tmp_path, make_args, fragment):  # noqa: F811
    args = make_args(tiny_runs, tmp_path)
    if "--out" not in args:
        args += ["--out", tmp_path / "out"]
    result = cli("report", *args, "--quiet")
    assert result.code == 2
    assert len(result.err_lines) == 1 and fragment in result.err_lines[0], result.err
    assert not (tiny_runs["l2"] / "report").exists()


def test_build_report_refuses_an_empty_list(tmp_path):
    with pytest.raises(DeltatlError, match="no run directories"):
        build_report([], str(tmp_path))


def test_the_delta_term_panel_holds_each_epochs_term_and_statistics_part_of_the_delta_run_only(report, tiny_runs):  # noqa: F811
    import csv
    import json

    with open(report["out"] / "delta_term.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [json.loads(line) for line in (tiny_runs["delta"] / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "event" not in r]
    assert len(rows) == len(logged) and {r["run"] for r in rows} == {rows[0]["run"]}
    for row, metrics in zip(rows, logged):
        assert float(row["train/reg/delta"]) == metrics["train/reg/delta"]
        assert float(row["delta/bn_gap"]) == metrics["delta/bn_gap"] > 0


BEYOND = ("bss", "lwf", "co-tuning", "stochnorm", "lp-ft", "wise-ft")


def test_the_methods_beyond_the_papers_get_learning_curves_distances_and_activation_maps(tmp_path):
    """Runs of every method beyond the papers (an extra ImageNet head for LwF and Co-Tuning,
    StochNorm's layers, LP-FT's probe, WiSE-FT's interpolated weights) rebuild and load for the
    analyses: each is a curve of the learning curves and of the filter distances."""
    import csv

    from test_analysis import make_data

    data = make_data(tmp_path / "data")
    runs = []
    for method in BEYOND:
        out = tmp_path / "runs" / method
        assert main(["train", "--data", str(data), *TINY_TRAIN_ARGS, "--lr", "0.05", "--method", method,
                     "--attention-epochs", "1", "--attention-cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
        runs.append(str(out))
    out = tmp_path / "report"
    html = Path(build_report(runs, str(out), filters=2, images=2, sample=6, progress=False)).read_text()
    for stem in ("learning_curves", "distance", "activation_maps"):
        assert f'id="fig-{stem}"' in html, stem
    for table in ("learning_curves.csv", "distance_curves.csv"):
        with open(out / table) as f:
            assert {row["run"] for row in csv.DictReader(f)} == set(BEYOND), table
