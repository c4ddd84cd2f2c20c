"""A learning rate per method, picked by short pilots (the grid's ``lr_pilot:``; see :mod:`peftlab.lab.compare_grid`).

Methods differ in the learning rate they need by orders of magnitude (a soft prompt wants 1e-2 or more, full
fine-tuning 1e-5), and a shared default leaves some of them near chance. So each (method, variant) group of a grid
trains one short pilot per candidate rate and every run of the group then trains at the candidate with the lowest
validation loss. This module reads the pilots' results and decides; :mod:`peftlab.lab.compare` runs them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from peftlab.lab.compare_grid import PILOT, PlannedRun
from peftlab.lab.result_record import ResultRecord


def pilot_loss(result: ResultRecord) -> float:
    """A pilot's score: its lowest validation loss (``inf`` when it diverged or its loss is not finite)."""
    if result.diverged:
        return math.inf
    losses = [point.loss for point in result.train_info.val_curve or []]
    finite = [float(v) for v in losses if isinstance(v, (int, float)) and math.isfinite(v)]
    return min(finite) if finite else math.inf


def choose(candidates: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The group's record: every candidate ``{factor, lr, val_loss}``, the chosen one (lowest loss; ties and an
    all-diverged group: the factor nearest 1, i.e. the untuned rate) and the untuned rate's loss for comparison.

    Args:
        candidates: ``{"factor", "lr", "val_loss"}`` per pilot.
    """
    if not candidates:
        raise ValueError("choose: no pilot candidates")
    nearest_one = min(candidates, key=lambda c: abs(math.log(c["factor"])))
    finite = [c for c in candidates if math.isfinite(c["val_loss"])]
    best = min(finite, key=lambda c: (c["val_loss"], abs(math.log(c["factor"])))) if finite else nearest_one
    untuned = next((c for c in candidates if c["factor"] == 1.0), None)
    return {"candidates": [dict(c) for c in candidates], "chosen_lr": best["lr"], "chosen_factor": best["factor"],
            "chosen_val_loss": best["val_loss"], "default_lr": untuned["lr"] if untuned else None,
            "default_val_loss": untuned["val_loss"] if untuned else None}


def _groups(runs: Sequence[PlannedRun]) -> dict[str, list[PlannedRun]]:
    groups: dict[str, list[PlannedRun]] = {}
    for run in runs:
        if run.kind == PILOT and run.pilot_group is not None:
            groups.setdefault(run.pilot_group, []).append(run)
    return groups


def _candidates(members: Sequence[PlannedRun], finished: dict[str, ResultRecord]) -> list[dict[str, Any]]:
    return [{"factor": p.grid["factor"], "lr": p.grid["lr"], "val_loss": pilot_loss(finished[p.stem])}
            for p in members]


def next_factor(members: Sequence[PlannedRun], finished: dict[str, ResultRecord]) -> float | None:
    """The factor of the group's next pilot past the edge, or None (best inside the range, extensions used up, or
    every pilot diverged). All of ``members`` must have finished."""
    extend = members[0].grid.get("extend", 0)
    if len(members) < 2 or sum(bool(p.grid.get("extension")) for p in members) >= extend:
        return None
    candidates = _candidates(members, finished)
    if not any(math.isfinite(c["val_loss"]) for c in candidates):
        return None
    best = choose(candidates)["chosen_factor"]
    factors = sorted(c["factor"] for c in candidates)
    if best == factors[-1]:
        return best * best / factors[-2]
    if best == factors[0]:
        return best * best / factors[1]
    return None


def _pilot_at(template: PlannedRun, factor: float) -> PlannedRun:
    """A pilot like ``template`` at another factor of the same untuned rate."""
    lr = factor * template.grid["lr"] / template.grid["factor"]
    stem = f"{PILOT}--{template.pilot_group}--lr{lr:.3g}"
    train = dataclasses.replace(template.cfg.train, lr=lr)
    cfg = dataclasses.replace(template.cfg, train=train, out=str(Path(template.cfg.out).parent / stem))
    return dataclasses.replace(template, stem=stem, cfg=cfg, result_path=template.result_path.parent / f"{stem}.json",
                               run_dir=template.run_dir.parent / stem,
                               grid={**template.grid, "stem": stem, "lr": lr, "factor": factor, "extension": True})


def extend_pilots(runs: list[PlannedRun], finished: dict[str, ResultRecord],
                  read: Callable[[Path], ResultRecord]) -> list[PlannedRun]:
    """Insert the next pilot past the edge after each finished group whose best rate is at an edge of those tried.

    A pilot so added whose result file exists (an earlier invocation ran it) is read into ``finished`` and may lead
    to the next one; the first one without a result is left for the caller to run. Returns the pilots added.
    """
    added: list[PlannedRun] = []
    while True:
        grew = False
        for members in _groups(runs).values():
            if not all(p.stem in finished for p in members):
                continue
            factor = next_factor(members, finished)
            if factor is None:
                continue
            pilot = _pilot_at(members[0], factor)
            runs.insert(runs.index(members[-1]) + 1, pilot)
            added.append(pilot)
            if pilot.result_path.exists():
                finished[pilot.stem] = read(pilot.result_path)
                grew = True
        if not grew:
            return added


def _json_loss(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no inf: a diverged pilot is recorded as null


def resolve(runs: Sequence[PlannedRun], finished: dict[str, ResultRecord]) -> dict[str, dict[str, Any]]:
    """Set the learning rate of every train run whose group's pilots have all finished; returns those groups'
    records (what was tried and chosen).

    Args:
        runs: the planned runs (pilots and train runs); train runs are updated in place (``cfg.train.lr`` and a
            ``grid["lr_pilot"]`` record).
        finished: pilot results by stem.
    """
    done = {}
    for group, members in _groups(runs).items():
        if not all(p.stem in finished for p in members) or next_factor(members, finished) is not None:
            continue  # pilots still to run, or one more past the edge (see extend_pilots)
        record = choose(_candidates(members, finished))
        for key in ("chosen_val_loss", "default_val_loss"):
            record[key] = _json_loss(record[key]) if record[key] is not None else None
        for candidate in record["candidates"]:
            candidate["val_loss"] = _json_loss(candidate["val_loss"])
        record["steps"] = members[0].cfg.train.max_steps
        record["n_train"] = members[0].grid["n_train"]
        record["validation_examples"] = members[0].cfg.data.max_validation
        for run in runs:
            if run.kind == "train" and run.pilot_group == group:
                run.cfg = dataclasses.replace(run.cfg, train=dataclasses.replace(run.cfg.train,
                                                                                  lr=record["chosen_lr"]))
                run.grid["lr_pilot"] = record
        done[group] = record
    return done


def unresolved(runs: Sequence[PlannedRun]) -> list[str]:
    """Groups with a train run whose learning rate no finished pilot has set yet."""
    return sorted({r.pilot_group for r in runs if r.kind == "train" and r.pilot_group is not None
                   and "lr_pilot" not in r.grid})
