"""What every analysis shares: its result record, figure files, colours and number files.

Figures are drawn with matplotlib's object-oriented API (``matplotlib.figure.Figure``), never with
``pyplot``: no global backend is set and no window can open, so the analyses run headless and do not
change the state of a user's interactive session.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from PIL import Image

from ..outputs import atomic_open

#: PNG resolution: sharp enough on screen, small enough to commit.
PNG_DPI = 110

#: One colour per method, the same in every figure (the paper: L2-SP blue, DELTA orange).
METHOD_COLOURS = {
    "src": "#000000",
    "l2": "#7f7f7f",
    "l2-fe": "#bcbd22",
    "l2-sp": "#1f77b4",
    "delta-noatt": "#2ca02c",
    "delta": "#ff7f0e",
}
#: A method with RIFLE (``delta+rifle3``): its own colour, distinct from the base method's and SRC's.
RIFLE_COLOURS = {"l2": "#8c564b", "l2-fe": "#e377c2", "l2-sp": "#17becf", "delta-noatt": "#9467bd",
                 "delta": "#d62728"}
_SPARE = ["#9467bd", "#8c564b", "#e377c2", "#17becf", "#d62728", "#bcbd22"]
_STYLES = ["-", "--", ":", "-."]


@dataclass
class Table:
    """A small result table: a caption, column names and rows of already formatted cells."""

    caption: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class AnalysisResult:
    """What one analysis produced: its figures (file stems, each with a ``.png`` and ``.svg``), its
    number files, tables for the report, and notes (e.g. runs it had to leave out, and why)."""

    name: str
    title: str
    description: str
    figures: list[str] = field(default_factory=list)
    data_files: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def run_styles(labels: Sequence[str], specs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``label -> {"color", "linestyle"}``: the method's colour; repeated methods (seeds, alphas) get
    different line styles; RIFLE variants have colours of their own (:data:`RIFLE_COLOURS`)."""
    styles: dict[str, dict[str, Any]] = {}
    seen: dict[str, int] = {}
    spare = iter(_SPARE * 10)
    extra: dict[str, str] = {}
    for label, spec in zip(labels, specs):
        base, _, rifle = spec.partition("+")
        colour = METHOD_COLOURS.get(spec) or extra.get(spec)
        if colour is None and rifle:
            colour = RIFLE_COLOURS.get(base)
        if colour is None:
            colour = extra.setdefault(spec, next(spare))
        n = seen.get(spec, 0)
        seen[spec] = n + 1
        styles[label] = {"color": colour, "linestyle": _STYLES[n % len(_STYLES)]}
    return styles


def new_figure(width: float, height: float) -> Figure:
    """A figure with a white background and constrained layout (labels never overlap)."""
    return Figure(figsize=(width, height), layout="constrained", facecolor="white")


def save_figure(fig: Figure, out_dir: str, stem: str) -> str:
    """Write ``stem.png`` and ``stem.svg`` into ``out_dir``; return ``stem``.

    The files carry no creation date, so the same numbers give the same files (clean diffs when
    committed).
    """
    os.makedirs(out_dir, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=PNG_DPI)
    buffer.seek(0)
    with Image.open(buffer) as image:
        # 256 adaptive colours: indistinguishable for plots and smooth heat maps, and several times
        # smaller than true colour (the report embeds every PNG).
        quantized = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                                  dither=Image.Dither.NONE)
        with atomic_open(os.path.join(out_dir, f"{stem}.png"), "wb") as f:
            quantized.save(f, format="PNG", optimize=True)
    with atomic_open(os.path.join(out_dir, f"{stem}.svg"), "wb") as f:
        fig.savefig(f, format="svg", metadata={"Date": None, "Creator": None})
    return stem


def plain_log_axis(axis: Any) -> None:
    """Label a log-scaled axis with plain numbers (0.2, 0.5, 2) instead of 2x10^-1; on an axis of less
    than two decades also the 2s and 5s (matplotlib would label every minor tick and crowd them)."""
    def minor(value: float, _position: Any) -> str:
        low, high = sorted(axis.get_view_interval())
        if value <= 0 or low <= 0 or high / low > 100:  # two decades or more: the decades suffice
            return ""
        mantissa = value / 10 ** math.floor(math.log10(value))
        return f"{value:g}" if abs(mantissa - 2) < 1e-6 or abs(mantissa - 5) < 1e-6 else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def write_csv(path: str, rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Write dict rows as CSV; missing cells are empty. Floats are written with ``repr`` so they read
    back exactly. Returns the file name."""
    rows = list(rows)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    with atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in columns})
    return os.path.basename(path)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def write_json(path: str, data: Any, indent: int | None = 1) -> str:
    """Write JSON (NaN and infinity become null, which every reader accepts); return the file name.
    ``indent=None`` writes one line (for files that are mostly long lists of numbers)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_open(path) as f:
        json.dump(_finite(data), f, indent=indent, allow_nan=False, separators=None if indent else (",", ":"))
        f.write("\n")
    return os.path.basename(path)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def fmt(value: float | None, digits: int = 2) -> str:
    """A table cell: a number with ``digits`` decimals, or ``-``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"
