"""Print a Markdown table of result.json files (what BENCHMARKS.md quotes).

Usage: python benchmarks/results_table.py runs/bench/e2e-*/result.json
Rows are named by the run folder (``runs/bench/e2e-all/dora/result.json`` -> ``dora``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from peftlab.lab.table import format_table


def main(paths: list[str]) -> None:
    results = [json.loads(Path(p).read_text()) for p in paths]
    print(format_table(results, markdown=True, labels=[Path(p).parent.name for p in paths]))
    for path, r in zip(paths, results, strict=True):
        info = r["train_info"]
        ev = info.get("eval", {}).get("test", {})
        print(f"- {path}: {r['run_info']['command']} | eval {ev.get('eval_examples_per_s', 0):.2f} examples/s"
              f" | machine: {r['run_info']['machine']['cpu']} x{r['run_info']['machine']['cpu_count']}"
              f" | commit {r['run_info']['git_commit']}")


if __name__ == "__main__":
    main(sys.argv[1:])
