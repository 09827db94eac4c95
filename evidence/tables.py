"""The README's per-run table of the DELTA evidence, read from the committed runs.

One row per finished run under ``evidence/fm30/compare`` for one seed: method, DELTA's settings, alpha,
validation and test top-1, and the last epoch's cross-entropy, weighted DELTA term and its BatchNorm
statistics part.

    .venv/bin/python evidence/tables.py [--seed 0]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).parent / "fm30" / "compare"


def _order(path: Path) -> tuple[str, float]:
    """By folder, then by alpha as a number (``alpha3`` before ``alpha10``)."""
    parts = path.relative_to(ROOT).parts
    alpha = next((float(p[5:]) for p in parts if p.startswith("alpha")), 0.0)
    return "/".join(p for p in parts if not p.startswith("alpha")), alpha


def rows(seed: int) -> list[list[str]]:
    table = []
    for summary_path in sorted(ROOT.glob(f"**/seed{seed}/summary.json"), key=_order):
        run = summary_path.parent
        summary = json.loads(summary_path.read_text())
        config = yaml.safe_load((run / "config.yaml").read_text())
        last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
        delta = config["method"].startswith("delta")
        settings = f"{config['delta_source_bn']}, {config['delta_reduction']}" if delta else "-"
        cell = lambda key, digits=3: "-" if last.get(key) is None else f"{last[key]:.{digits}g}"  # noqa: E731
        table.append([f"`{config['method']}`" + (f" +rifle{config['rifle']}" if config.get("rifle") else ""),
                      settings, "-" if summary.get("alpha") is None else f"{summary['alpha']:g}",
                      f"{summary['val_top1']:.2f}", f"{summary['test_top1']:.2f}", cell("train/ce"),
                      cell("train/reg/delta"), cell("delta/bn_gap")])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    seed = parser.parse_args().seed
    header = ["method", "source BN, term", "alpha", "val top-1", "test top-1", "CE (last epoch)",
              "DELTA term (last epoch)", "statistics part (last epoch)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows(seed):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
