"""The README's RIFLE table from the runs finished so far under ``evidence/fm30/rifle``.

Per method spec: test top-1 mean ± std over the seeds done, and each +rifleK spec minus its method
without RIFLE, paired by seed over the seeds both have (mean, std, Student-t 95 % interval), as
``deltatl compare`` reports them once every seed is done.

    .venv/bin/python evidence/rifle_table.py
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import yaml

from deltatl.compare import paired_difference

ROOT = Path(__file__).parent / "fm30" / "rifle"


def finished() -> dict[str, dict[int, float]]:
    """spec -> {seed: test top-1} of every finished run."""
    runs: dict[str, dict[int, float]] = {}
    for path in sorted(ROOT.glob("**/seed*/summary.json")):
        config = yaml.safe_load((path.parent / "config.yaml").read_text())
        spec = config["method"] + (f"+rifle{config['rifle']}" if config.get("rifle") else "")
        runs.setdefault(spec, {})[config["seed"]] = json.loads(path.read_text())["test_top1"]
    return runs


def main() -> None:
    runs = finished()
    print("| method | seeds done | test top-1 (%) |\n|---|---|---|")
    for spec, tests in runs.items():
        values = list(tests.values())
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        print(f"| {spec} | {', '.join(map(str, sorted(tests)))} | {statistics.fmean(values):.2f}{spread} |")
    print("\n| RIFLE minus without | seeds | mean | std | 95 % interval |\n|---|---|---|---|---|")
    for spec, tests in runs.items():
        base = spec.rsplit("+rifle", 1)[0]
        if base == spec or base not in runs:
            continue
        seeds = sorted(set(tests) & set(runs[base]))
        if not seeds:
            continue
        row = paired_difference([tests[s] for s in seeds], [runs[base][s] for s in seeds])
        spread = (f"{row['diff_std']:.2f} | [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]" if len(seeds) > 1
                  else "- | -")
        print(f"| {spec} - {base} | {', '.join(map(str, seeds))} | {row['diff_mean']:+.2f} | {spread} |")


if __name__ == "__main__":
    main()
