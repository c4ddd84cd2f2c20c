"""Writing an analysis: a JSON (facts for the report) next to a PNG (the figure), under one folder and file stem.

Every analysis JSON has ``analysis`` (its kind) and ``figure`` (the PNG's file name, relative to the JSON), so a
report can find and embed the figure from the JSON alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window (must precede the pyplot import)

import matplotlib.pyplot as plt  # noqa: E402

from peftlab.durable import atomic_write_json  # noqa: E402


def finite(value: float | None) -> float | None:
    """``value`` as a JSON-safe float (NaN / inf -> None)."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def write_analysis(out: str | Path, stem: str, kind: str, data: dict[str, Any], figure: plt.Figure) -> Path:
    """Save ``figure`` as ``<out>/<stem>.png`` and ``data`` as ``<out>/<stem>.json``; returns the JSON path.

    The figure is closed afterwards (pyplot keeps every open figure alive otherwise).
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / f"{stem}.png"
    try:
        figure.savefig(png, dpi=110, bbox_inches="tight")
    finally:
        plt.close(figure)
    path = folder / f"{stem}.json"
    atomic_write_json(path, {"analysis": kind, "figure": png.name, **data})
    return path
