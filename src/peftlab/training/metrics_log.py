"""``<out>/metrics.jsonl``: one JSON object per event (train loss, validation, early stop), appended as it happens.

Every checkpoint records the log's length in bytes after fsyncing it (:meth:`MetricsLog.sync`); resuming from that
checkpoint cuts the log back to that length (:meth:`MetricsLog.truncate_to`), which drops both the records of
steps after the checkpoint (the resumed run writes them again) and a line half-written by a killed process, so the
log of an interrupted-and-resumed run holds each step's records exactly once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from peftlab.durable import atomic_write_text, fsync_file


class MetricsLog:
    """Append-only JSONL log; every record gets a wall-clock ``time``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        # One write() of the whole line: a kill leaves at most one partial last line, which resume cuts off.
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """Every complete record (a partial last line of a killed writer is not one)."""
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").split("\n")
        return [json.loads(line) for line in lines[:-1] if line.strip()]  # the text after the last newline: partial

    def sync(self) -> int:
        """fsync the log and return its length in bytes (what a checkpoint records, see :meth:`truncate_to`)."""
        if not self.path.exists():
            return 0
        fsync_file(self.path)
        return self.path.stat().st_size

    def truncate_to(self, size: int) -> None:
        """Cut the log back to ``size`` bytes (its length at the checkpoint being resumed) and fsync it."""
        if not self.path.exists():
            return
        if self.path.stat().st_size > size:
            os.truncate(self.path, size)
            fsync_file(self.path)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` and any partial line; for checkpoints that recorded no length."""
        if not self.path.exists():
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
