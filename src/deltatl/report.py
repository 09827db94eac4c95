"""``deltatl report RUN_DIR... --out DIR``: every analysis that applies to the runs, on one HTML page.

The page (``DIR/index.html``) is self-contained: figures are embedded as base64 PNG, styles are inline,
and nothing is loaded from anywhere else, so it can be mailed or committed alone. Beside it, ``DIR``
holds every figure as PNG and SVG and the numbers behind each (CSV or JSON), and ``results.csv``.

Which analyses apply:

- learning curves: always;
- distance from the start, activation maps, channel attention vs activation: runs with a checkpoint
  (activation maps also need the run's dataset, for the sample images);
- keypoint activations: runs on ``cub200``, or any runs given ``keypoints=`` a folder in CUB's format;
- DELTA's term and its BatchNorm-statistics part: runs with DELTA's term;
- channel attention: DELTA runs (``attention.json``);
- RIFLE: runs that re-initialised their head.

An analysis that cannot run (e.g. the dataset is not on this machine) is listed with the reason, and the
others still run.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import os
from collections.abc import Callable, Sequence
from typing import Any

from tqdm import tqdm

from . import __version__
from .analysis.activations import (SOURCE, activation_analysis, channel_strength, collect_features,
                                   default_map_layer, load_networks, same_input_group)
from .analysis.attention import attention_analysis
from .analysis.curves import learning_curves
from .analysis.delta_term import delta_runs, delta_term_analysis
from .analysis.distance import distance_analysis
from .analysis.keypoints import keypoint_analysis, keypoints_source
from .analysis.plotting import AnalysisResult, Table, fmt, write_csv
from .analysis.rifle import rifle_analysis
from .analysis.runs import Run, load_runs, sample_images
from .errors import DeltatlError
from .outputs import atomic_open, check_output_folder
from .models import preprocessing

PAGE = "index.html"
#: Why an analysis is absent when none of the runs calls for it (listed at the end of the page).
# What report writes in --out: the page, and every figure and number file beside it.
OWN_FILES = ("index.html", "*.png", "*.svg", "*.csv", "*.json", "*.tmp")
NOT_APPLICABLE = {
    "Keypoint activations": "needs part annotations: runs on --data cub200, or --keypoints DIR in CUB's format",
    "Channel attention": "no DELTA run (attention.json) among these runs",
    "DELTA's term": "no run with DELTA's term (delta, delta-noatt) among these runs",
    "RIFLE re-initialisations": "no run re-initialised its head (--rifle K)",
}
#: Settings shown once above the results table when every run has the same value.
SHARED_SETTINGS = ("data", "train_per_class", "val_per_class", "test_per_class", "model", "pretrained", "image_size",
                   "epochs", "iters", "batch_size", "lr", "schedule", "beta", "delta_reduction", "delta_source_bn")


def results_table(runs: Sequence[Run]) -> Table:
    """One row per run: method, alpha, RIFLE, seed, accuracies, budget and where it lives."""
    rows = []
    for run in runs:
        s = run.summary or {}
        rows.append([run.label, run.method, "-" if run.alpha is None else f"{run.alpha:g}", str(run.rifle or "-"),
                     str(run.seed), fmt(s.get("val_top1")), fmt(s.get("test_top1")),
                     str(s.get("steps", "-")), fmt(s.get("seconds"), 0), run.path])
    return Table("Results (top-1 %, the test split evaluated once at the end)",
                 ["run", "method", "alpha", "RIFLE", "seed", "val top-1", "test top-1", "steps", "seconds",
                  "run directory"], rows)


def shared_settings(runs: Sequence[Run]) -> dict[str, Any]:
    """The :data:`SHARED_SETTINGS` on which every run agrees."""
    out = {}
    for key in SHARED_SETTINGS:
        values = {repr(r.config.get(key)) for r in runs}
        if len(values) == 1 and runs[0].config.get(key) is not None:
            out[key] = runs[0].config.get(key)
    return out


def _runs_for(run_dirs: Sequence[str], out: str) -> list[Run]:
    """The runs, once ``out`` is known not to lie inside one of them nor to hold foreign files."""
    runs = load_runs(run_dirs)
    out_real = os.path.realpath(out)
    for run in runs:
        if out_real == os.path.realpath(run.path) or out_real.startswith(os.path.realpath(run.path) + os.sep):
            raise DeltatlError(f"`out` {out} lies inside the run directory {run.path}; choose another folder")
    check_output_folder(out, "report", OWN_FILES)
    return runs


def _run_notes(runs: Sequence[Run], with_checkpoint: Sequence[Run]) -> list[str]:
    """What the page says about runs that are not finished or have no checkpoint."""
    notes = [f"{r.label}: not finished (no summary.json); its latest checkpoint is used" for r in runs
             if not r.finished]
    if len(with_checkpoint) < len(runs):
        notes.append("no checkpoint (left out of the analyses of weights and features): "
                     + ", ".join(r.label for r in runs if r not in with_checkpoint))
    return notes


def _run_analyses(steps: Sequence[tuple[str, Callable[[], AnalysisResult], bool]], progress: bool
                  ) -> tuple[list[AnalysisResult], list[tuple[str, str]]]:
    """Each applicable analysis in order: its result, or why it is not shown."""
    results: list[AnalysisResult] = []
    skipped: list[tuple[str, str]] = []
    bar = tqdm(steps, desc="report", unit="analysis", disable=None if progress else True)
    for title, step, applies in bar:
        bar.set_postfix_str(title)
        if not applies:
            skipped.append((title, NOT_APPLICABLE[title]))
            continue
        try:
            results.append(step())
        except DeltatlError as exc:
            # One analysis that cannot run (missing dataset, hub weights offline...) does not stop the rest.
            skipped.append((title, str(exc)))
    return results, skipped


def build_report(run_dirs: Sequence[str], out: str, *, layer: str | None = None, filters: int = 3,
                 images: int = 2, sample: int = 32, keypoints: str | None = None, keypoint_images: int = 300,
                 seed: int = 0, device: str = "cpu", progress: bool = True) -> str:
    """Run every applicable analysis on the runs and write ``out/index.html``; return its path.

    Args:
        run_dirs: run directories (a path given twice counts once).
        out: the report folder (created; files of an earlier report there are replaced).
        layer: tapped layer of the activation maps (default: the deepest with maps >= 8 wide).
        filters, images: weak source channels shown, and images per channel.
        sample: test images on which channel activations are measured.
        keypoints: a folder in CUB's format with part annotations (default: the runs' own, on cub200).
        keypoint_images: annotated test images used (0 = all).
        seed: which sample images are drawn.
        device: where the networks run (``cpu``, ``cuda``, ``auto``...).

    Raises:
        DeltatlError: a path is not a run directory, or ``out`` is one of the runs.
    """
    from .run import resolve_device

    runs = _runs_for(run_dirs, out)
    dev = resolve_device(device)
    os.makedirs(out, exist_ok=True)
    with_checkpoint = [r for r in runs if os.path.isfile(r.checkpoint_path)]
    notes = _run_notes(runs, with_checkpoint)
    state: dict[str, Any] = {}

    def curves() -> AnalysisResult:
        return learning_curves(runs, out)

    def distance() -> AnalysisResult:
        if not with_checkpoint:
            raise DeltatlError("no run has a checkpoint")
        return distance_analysis(with_checkpoint, out, progress=progress)

    def features() -> AnalysisResult:
        if not with_checkpoint:
            raise DeltatlError("no run has a checkpoint")
        group, group_notes = same_input_group(with_checkpoint)
        networks = load_networks(group, progress=progress)
        networks.source.to(dev)
        for model in networks.trained.values():
            model.to(dev)
        picked = sample_images(group[0], sample, seed=seed, pre=preprocessing(networks.source))
        state.update(group=group, networks=networks, sample=collect_features(networks, picked, progress))
        result = activation_analysis(group, out, networks, state["sample"], layer=layer, filters=filters,
                                     images=images)
        result.notes = group_notes + result.notes
        return result

    def keypoint() -> AnalysisResult:
        if "networks" not in state:
            raise DeltatlError("the networks could not be loaded (see activation maps)")
        group = state["group"]
        locations = keypoints_source(group[0], keypoints)
        if locations is None:
            raise DeltatlError("no part annotations: the runs are not on cub200 and no `keypoints` folder was given")
        shapes = {n: tuple(t.shape[1:]) for n, t in state["sample"].outputs[SOURCE].items()}
        return keypoint_analysis(group, out, state["networks"], locations, layer=layer or default_map_layer(shapes),
                                 count=keypoint_images, seed=seed, progress=progress)

    def attention() -> AnalysisResult:
        strength = None
        if "sample" in state and any(r.attention_path for r in state["group"]):
            strength = {n: channel_strength(t) for n, t in state["sample"].outputs[SOURCE].items()}
        delta = [r for r in runs if r.attention_path]
        if strength is not None and not all(r in state["group"] for r in delta):
            strength = None  # the source activations belong to another architecture or data
        return attention_analysis(runs, out, strength)

    def term() -> AnalysisResult:
        return delta_term_analysis(runs, out)

    def rifle() -> AnalysisResult:
        return rifle_analysis(runs, out)

    steps: list[tuple[str, Callable[[], AnalysisResult], bool]] = [
        ("Learning curves", curves, True),
        ("Distance from the starting point", distance, True),
        ("Activation maps", features, True),
        ("Keypoint activations", keypoint, bool(keypoints) or any(r.config.get("data") == "cub200" for r in runs)),
        ("DELTA's term", term, bool(delta_runs(runs))),
        ("Channel attention", attention, any(r.attention_path for r in runs)),
        ("RIFLE re-initialisations", rifle, any(r.rifle_steps for r in runs)),
    ]
    results, skipped = _run_analyses(steps, progress)
    table = results_table(runs)
    write_csv(os.path.join(out, "results.csv"), [dict(zip(table.header, row)) for row in table.rows])
    page = render_html(runs, results, skipped, notes, out)
    path = os.path.join(out, PAGE)
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:2rem auto;
max-width:1150px;padding:0 1rem;color:#222;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
.meta{color:#666;font-size:.9rem}nav a{margin-right:1rem}
table{border-collapse:collapse;margin:.6rem 0 1rem;font-size:.85rem}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}tr:nth-child(even) td{background:#fafafa}.caption{font-weight:600;margin:1rem 0 0}
table{margin-top:.3rem}figure{margin:1rem 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.85rem}.note{color:#8a5a00;font-size:.9rem}.files{color:#666;font-size:.85rem}
code{background:#f4f4f4;padding:0 .2rem}
"""


def _table_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    # The caption above the table rather than <caption>, which would wrap to the table's width.
    return f'<p class="caption">{html.escape(table.caption)}</p><table><tr>{head}</tr>{body}</table>'



def _figure_html(out: str, stem: str, caption: str) -> str:
    with open(os.path.join(out, f"{stem}.png"), "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return (f'<figure id="fig-{html.escape(stem)}"><img alt="{html.escape(caption)}" '
            f'src="data:image/png;base64,{data}"></figure>')


def render_html(runs: Sequence[Run], results: Sequence[AnalysisResult], skipped: Sequence[tuple[str, str]],
                notes: Sequence[str], out: str) -> str:
    """The report page (see the module doc)."""
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>deltatl report</title>"
             f"<style>{_CSS}</style></head><body>",
             "<h1>deltatl report</h1>",
             f"<p class=\"meta\">{len(runs)} run(s) · deltatl {html.escape(__version__)} · {now}</p>"]
    parts.append("<nav>" + "".join(f'<a href="#{html.escape(r.name)}">{html.escape(r.title)}</a>' for r in results)
                 + "</nav>")
    shared = shared_settings(runs)
    if shared:
        parts.append("<p>Shared settings: " + ", ".join(
            f"<code>{html.escape(k.replace('_', '-'))}={html.escape(str(v))}</code>" for k, v in shared.items()) + "</p>")
    parts.append(_table_html(results_table(runs)))
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    for result in results:
        parts.append(f'<section id="{html.escape(result.name)}"><h2>{html.escape(result.title)}</h2>'
                     f"<p>{html.escape(result.description)}</p>")
        parts += [_figure_html(out, stem, result.title) for stem in result.figures]
        parts += [_table_html(t) for t in result.tables]
        parts += [f'<p class="note">{html.escape(n)}</p>' for n in result.notes]
        files = [f"{stem}.{ext}" for stem in result.figures for ext in ("png", "svg")] + list(result.data_files)
        parts.append('<p class="files">Files in this folder: ' + ", ".join(html.escape(f) for f in files) + "</p>")
        parts.append("</section>")
    if skipped:
        parts.append("<section id=\"skipped\"><h2>Not shown</h2><ul>" + "".join(
            f"<li><b>{html.escape(t)}</b>: {html.escape(reason)}</li>" for t, reason in skipped) + "</ul></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
