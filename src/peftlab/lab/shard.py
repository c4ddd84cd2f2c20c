"""Deterministic shards of a grid (``peftlab compare GRID --shard k/n``), for a Slurm job array, Kubernetes indexed
jobs or n terminals.

The runs are grouped into units that must run in one process: the lead-3 baseline is computed from the zero-shot
run's outputs, so the two stay together; every other run is a unit of its own. Unit u (in the grid's order) goes
to shard ``u mod n + 1``, so every run belongs to exactly one shard whatever the machines, and results land where
an unsharded run puts them (one file per run); ``peftlab report`` reads them all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TypeVar

from peftlab.config import ConfigError

Run = TypeVar("Run")
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str) -> tuple[int, int]:
    """``"k/n"`` (1 <= k <= n) as (k, n).

    Raises:
        ConfigError: anything else, naming the option and the expected form.
    """
    match = _SHARD.match(text or "")
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ConfigError(f"--shard: expected k/n with 1 <= k <= n (e.g. --shard 2/8), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def shard_units(kinds: Sequence[str]) -> list[int]:
    """The unit of each run, given each run's kind ("train" | "zero-shot" | "lead-3"): lead-3 shares the zero-shot
    run's unit, every other run starts a new one."""
    units: list[int] = []
    zero_shot_unit: int | None = None
    for kind in kinds:
        if kind == "lead-3" and zero_shot_unit is not None:
            units.append(zero_shot_unit)
            continue
        units.append(max(units, default=-1) + 1)
        if kind == "zero-shot":
            zero_shot_unit = units[-1]
    return units


def select_shard(runs: Sequence[Run], kinds: Sequence[str], k: int, n: int) -> list[Run]:
    """The runs of shard k of n, in the grid's order."""
    return [run for run, unit in zip(runs, shard_units(kinds), strict=True) if unit % n == k - 1]
