"""The result files a report is built from (:mod:`peftlab.lab.report`): reading them, naming each run's grid cell,
and grouping the runs of one (task, method, variant, N) over seeds, with each group's mean and 95% interval.

Input: ``RESULTS_DIR/<task>/<method>--<variant>--n<N>--seed<k>.json`` (a result record, see
:mod:`peftlab.lab.result_record`, with its ``grid`` cell ``{method, variant, n_train, seed, ...}``; baselines
such as ``lead-3--default--n0--seed0.json`` may hold metrics only) and/or plain run folders with a ``result.json``
(method, variant and N then come from ``run_info.config`` / ``train_info``).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.lab.result_record import RESULT_NAME, ResultError, ResultRecord, SplitMetrics, TrainInfo, read_result

STEM_RE = re.compile(r"(?P<method>.+?)--(?P<variant>.+?)--n(?P<n>\d+|all)--seed(?P<seed>\d+)")
# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30; larger df use a Cornish-Fisher expansion.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


class ReportError(ValueError):
    """A results folder or file that a report cannot be built from (the message names the file and key)."""


@dataclass
class Run:
    """One result file and the grid cell it belongs to."""

    path: Path
    task: str
    method: str
    variant: str
    n_train: int
    seed: int
    record: ResultRecord
    embedded_in: Path | None = None  # a baseline read from another run's metrics[split]["baselines"]

    @property
    def info(self) -> TrainInfo:
        return self.record.train_info


@dataclass
class Stat:
    """Mean over seeds with the half-width of its 95% confidence interval (None for a single seed)."""

    mean: float
    half: float | None
    n: int

    def text(self, fmt: Callable[[float], str] = lambda v: f"{v:.2f}") -> str:
        return f"{fmt(self.mean)} ± {fmt(self.half)}" if self.half is not None else f"{fmt(self.mean)} (1 seed)"


@dataclass
class Group:
    """The runs of one (task, method, variant, N) cell, over seeds."""

    task: str
    method: str
    variant: str
    n_train: int
    runs: list[Run] = field(default_factory=list)

    @property
    def label(self) -> str:
        variant = "" if self.variant == "default" else f"/{self.variant}"
        return f"{self.method}{variant}" + (f" N={self.n_train}" if self.n_train else "")

    def stat(self, get: Callable[[Run], float | None]) -> Stat | None:
        values = [v for v in (get(r) for r in self.runs) if v is not None]
        return mean_ci(values) if values else None


def t_quantile_975(df: int) -> float:
    """t(0.975, df): exact table up to 30 degrees of freedom, then z + (z^3+z)/4df + (5z^5+16z^3+3z)/96df^2."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: list[float]) -> Stat:
    """Mean and 95% CI half-width t(0.975, n-1) * s / sqrt(n), s the sample standard deviation (ddof=1)."""
    n = len(values)
    if n < 2:
        return Stat(float(values[0]), None, n)
    return Stat(statistics.fmean(values), t_quantile_975(n - 1) * statistics.stdev(values) / math.sqrt(n), n)


def natural_key(text: str) -> list[Any]:
    """Sort key that orders 'vt5' before 'vt10'."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", text) if p]


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc


def _plain_run_cell(record: ResultRecord, path: Path) -> tuple[str, str, str, int, int]:
    """(task, method, variant, N, seed) of a result.json written by `peftlab train/eval` (no grid record)."""
    run_info = record.run_info
    if not isinstance(run_info.config, dict):
        raise ReportError(f"{path}: a result without a 'grid' record needs run_info.config (to name method and task)")
    method = record.train_info.method_name or run_info.config_value("method", "name")
    if not method:
        raise ReportError(f"{path}: no method name in train_info.method.name or run_info.config.method.name")
    options = run_info.config_value("method", "options") or {}
    shown = {k: v for k, v in sorted(options.items()) if v is not None}
    variant = ",".join(f"{k}={json.dumps(v)[:24]}" for k, v in shown.items()) if method != "zero-shot" else ""
    task = run_info.config_value("task", "name") or "unknown-task"
    return task, method, variant or "default", int(record.train_info.train_examples or 0), int(run_info.seed or 0)


def _n_train(value: Any, record: ResultRecord) -> int:
    """N of a grid cell; ``None``/``all`` (every training example) becomes the count the run actually used."""
    if value is None or value == "all":
        return int(record.train_info.train_examples or 0)
    return int(value)


def read_run(path: Path, root: Path) -> Run:
    """Read one result file; the grid cell comes from its ``grid`` record, its (folder) name, or its config."""
    try:
        record = read_result(path)
    except ResultError as exc:
        raise ReportError(str(exc)) from exc
    rel = path.relative_to(root)
    # <task>/<stem>.json, or a compare run folder <task>/runs/<stem>/result.json
    in_folder = path.name == RESULT_NAME
    match = STEM_RE.fullmatch(path.parent.name if in_folder else path.stem)
    folder_task = rel.parts[0] if len(rel.parts) > (2 if in_folder else 1) else None
    grid = record.grid
    if grid is not None:
        cell = (str(grid.method), str(grid.variant), _n_train(grid.n_train, record), int(grid.seed))
    elif match:
        cell = (match["method"], match["variant"], _n_train(match["n"], record), int(match["seed"]))
    else:
        task, *cell = _plain_run_cell(record, path)
        return Run(path, task, *cell, record)
    task = folder_task or _plain_run_cell(record, path)[0]
    return Run(path, task, *cell, record)


def load_runs(root: str | Path) -> list[Run]:
    """Every result under ``root`` (skipping ``analysis/`` and ``report_files/``); a run counts once even when
    both ``<task>/<stem>.json`` and its run folder ``<task>/runs/<stem>/result.json`` exist."""
    root = Path(root)
    if root.is_file():
        raise ReportError(f"{root}: is a file; give the results folder that holds the run files (e.g. results)")
    if not root.is_dir():
        raise ReportError(f"{root}: results folder not found")
    # Dot-names are writes in progress or left by a killed writer (peftlab.durable): never results.
    paths = [p for p in root.rglob("*.json") if (p.name == RESULT_NAME or STEM_RE.fullmatch(p.stem))
             and p.relative_to(root).parts[0] != "analysis" and "report_files" not in p.parts
             and "pilots" not in p.relative_to(root).parts[:2]  # learning-rate pilots (compare's lr_pilot)
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    runs, seen, stems = [], set(), set()
    for path in sorted(paths, key=lambda p: (p.name == RESULT_NAME, p)):  # grid files before run-folder copies
        top = path.relative_to(root).parts[0]
        if path.name == RESULT_NAME and (top, path.parent.name) in stems:
            continue
        run = read_run(path, root)
        info = run.record.run_info
        key = (info.started, info.finished, info.command) if info.started else path
        if key not in seen:
            seen.add(key)
            stems.add((top, path.stem))
            runs.append(run)
    if not runs:
        raise ReportError(f"{root}: no results found (expected <task>/<method>--<variant>--n<N>--seed<k>.json "
                          f"files or run folders holding result.json)")
    return runs


def group_runs(runs: list[Run]) -> dict[str, list[Group]]:
    """{task: groups}, baselines (N=0) first, then by method, variant (natural order) and N; runs by seed."""
    tasks: dict[str, dict[tuple[str, str, int], Group]] = {}
    for run in runs:
        cells = tasks.setdefault(run.task, {})
        cells.setdefault((run.method, run.variant, run.n_train),
                         Group(run.task, run.method, run.variant, run.n_train)).runs.append(run)
    out = {}
    for task in sorted(tasks):
        groups = sorted(tasks[task].values(),
                        key=lambda g: (g.n_train > 0, g.method, natural_key(g.variant), g.n_train))
        for g in groups:
            g.runs.sort(key=lambda r: r.seed)
        out[task] = groups
    return out


def choose_split(groups: list[Group], wanted: str) -> str:
    """``wanted`` when any run has it, else the first split found (e.g. only 'validation' was evaluated)."""
    splits = [s for g in groups for r in g.runs for s in r.record.metrics]
    return wanted if wanted in splits or not splits else splits[0]


def add_embedded_baselines(groups: list[Group], split: str) -> None:
    """Baselines a task scores inside each run (``metrics[split]['baselines']``, e.g. lead-3) become rows when no
    result file of that name exists."""
    have = {g.method for g in groups}
    for g in list(groups):
        for run in g.runs:
            for name, values in run.record.baselines_of(split).items():
                if name not in have and isinstance(values, dict):
                    have.add(name)
                    record = ResultRecord(metrics={split: SplitMetrics(scores=values)})
                    base = Run(run.path, g.task, name, "default", 0, 0, record, run.path)
                    groups.insert(0, Group(g.task, name, "default", 0, [base]))

