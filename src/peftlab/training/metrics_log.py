"""``<out>/metrics.jsonl``: one JSON object per event (train loss, validation, early stop), appended as it happens."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from peftlab.training.checkpoint import atomic_write_text


class MetricsLog:
    """Append-only JSONL log; every record gets a wall-clock ``time``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (a resumed run re-logs them); rewritten atomically."""
        if not self.path.exists():
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
