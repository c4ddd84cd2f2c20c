"""`peftlab demo`: the built-in comparison, offline, on the real SmolLM2-135M and generated data.

It is ``peftlab compare`` on the packaged grid ``demo_grid.yaml`` (zero-shot, LoRA, prompt tuning and last-layer
tuning, each trained on N = 16 and 96 generated table-to-text examples) followed by ``peftlab report``: a table on
the terminal and ``report.md`` / ``report.html`` under the results folder. Finished runs are skipped, so an
interrupted demo continues where it stopped. Sized for a few minutes on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

from peftlab.lab.compare import compare
from peftlab.lab.compare_grid import load_grid
from peftlab.lab.report import write_report
from peftlab.lab.result_record import ResultRecord

DEMO_GRID = Path(__file__).with_name("demo_grid.yaml")


def run_demo(overrides: list[str], results: str = "results") -> tuple[list[ResultRecord], Path]:
    """Run (or reuse) the demo grid with ``overrides`` (grid keys or run keys) and write the report.

    Returns:
        The results of the grid's runs and the path of ``report.html``.
    """
    overrides = [f"results={results}", *overrides]  # a `results=` of the caller's comes later and wins
    root = load_grid(DEMO_GRID, overrides).results  # the grid parser reads it, so the report goes where the runs go
    runs = compare(DEMO_GRID, overrides, command="peftlab demo " + " ".join(overrides[1:]))
    _, html = write_report(root)
    print(f"report: {html} (and report.md beside it)")
    return runs, html
