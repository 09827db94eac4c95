"""The README's table of the methods beyond the papers, from stage ``beyond``'s ``results-beyond.csv``.

Per method: its weight, test and validation top-1 (mean ± sample std over the seeds), and its test
top-1 minus `l2`'s and minus `delta`'s (deltatl's default), paired by seed: mean and Student-t 95 %
interval, as ``deltatl compare`` computes them (its ``paired-beyond.csv`` has the `l2` column and each
method minus its parts; the `delta` column is computed here, the same way, from the same per-seed scores).

    .venv/bin/python evidence/beyond_table.py [evidence/fm30/compare/results-beyond.csv]
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from deltatl.compare import paired_difference

RESULTS = Path(__file__).parent / "fm30" / "compare" / "results-beyond.csv"
REFERENCES = ("l2", "delta")


def paired(tests: dict[str, list[float]], method: str, minus: str) -> str:
    """``+1.23 [+0.45, +2.01]``: ``method`` minus ``minus``, paired by seed; bold when the interval is clear of 0."""
    if method == minus or minus not in tests:
        return "-"
    row = paired_difference(tests[method], tests[minus])
    text = f"{row['diff_mean']:+.2f} [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"
    clear = round(row["ci_low"], 2) > 0 or round(row["ci_high"], 2) < 0  # as printed: [-1.00, -0.00] touches 0
    return f"**{text}**" if clear else text


def main(path: Path) -> None:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    tests = {r["method"]: json.loads(r["tests"]) for r in rows}
    print("| method | weight | test top-1 (%) | val top-1 (%) | minus `l2`, paired | minus `delta`, paired | s / run |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        weight = f"{float(r['alpha']):g}" if r["alpha"] else "-"
        print(f"| `{r['method']}` | {weight} | {float(r['test_mean']):.2f} ± {float(r['test_std']):.2f} | "
              f"{float(r['val_mean']):.2f} ± {float(r['val_std']):.2f} | "
              + " | ".join(paired(tests, r["method"], m) for m in REFERENCES)
              + f" | {float(r['seconds_mean']):.0f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS)
