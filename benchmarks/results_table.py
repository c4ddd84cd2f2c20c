"""Print a Markdown table of result.json files (what BENCHMARKS.md quotes).

Usage: python benchmarks/results_table.py runs/bench/e2e-*/result.json
Rows are named by the run folder (``runs/bench/e2e-all/dora/result.json`` -> ``dora``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from peftlab.lab.result_record import EvalSpeed, read_result
from peftlab.lab.table import format_table


def main(paths: list[str]) -> None:
    results = [read_result(p) for p in paths]
    print(format_table(results, markdown=True, labels=[Path(p).parent.name for p in paths]))
    for path, r in zip(paths, results, strict=True):
        speed = (r.train_info.eval or {}).get("test") or EvalSpeed()
        machine = r.run_info.machine or {}
        print(f"- {path}: {r.run_info.command} | eval {speed.eval_examples_per_s or 0:.2f} examples/s"
              f" | machine: {machine['cpu']} x{machine['cpu_count']} | commit {r.run_info.git_commit}")


if __name__ == "__main__":
    main(sys.argv[1:])
