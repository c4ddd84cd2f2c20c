"""`peftlab report RESULTS_DIR`: one Markdown and one self-contained HTML report built only from result files.

Input: ``RESULTS_DIR/<task>/<method>--<variant>--n<N>--seed<k>.json`` (a result record, see
:mod:`peftlab.lab.result_record`, with its ``grid`` cell ``{method, variant, n_train, seed, ...}``; baselines
such as ``lead-3--default--n0--seed0.json`` may hold metrics only) and/or plain run folders with a ``result.json``
(method, variant and N then come from ``run_info.config`` / ``train_info``). Runs are grouped by (task, method,
variant, N); every number is a mean over seeds with a 95% Student-t confidence interval.
``RESULTS_DIR/analysis/*.png|*.json`` becomes its own section.

Output (``--out``, default RESULTS_DIR): ``report.md`` (images linked from ``report_files/``) and ``report.html``
(images embedded as data URIs, inline CSS, no script and no external resource: it opens offline).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.durable import atomic_write_bytes, atomic_write_text
from peftlab.lab.report_render import Block, Heading, Image, Para, Pre, Table, slug, to_html, to_markdown
from peftlab.lab.result_record import (
    RESULT_NAME,
    LrPilot,
    ResultError,
    ResultRecord,
    SplitMetrics,
    TrainInfo,
    number,
    read_result,
)
from peftlab.lab.significance import example_intervals, significance_blocks, with_example_intervals
from peftlab.lab.table import METRIC_ORDER, format_bytes, format_count

STEM_RE = re.compile(r"(?P<method>.+?)--(?P<variant>.+?)--n(?P<n>\d+|all)--seed(?P<seed>\d+)")
# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30; larger df use a Cornish-Fisher expansion.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
MAX_SAMPLE_EXAMPLES = 3
MAX_CURVES = 10


class ReportError(ValueError):
    """A results folder or file that a report cannot be built from (the message names the file and key)."""


# ----------------------------------------------------------------------------------------------- aggregation


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


def _natural(text: str) -> list[Any]:
    """Sort key that orders 'vt5' before 'vt10'."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", text) if p]


def _read_json(path: Path) -> Any:
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
        groups = sorted(tasks[task].values(), key=lambda g: (g.n_train > 0, g.method, _natural(g.variant), g.n_train))
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


def metric_getter(split: str, name: str) -> Callable[[Run], float | None]:
    """A run's ``metrics[split][name]`` (None when absent or not a number)."""
    return lambda run: number(run.record.metric(split, name))


def info_getter(field_of: Callable[[TrainInfo], Any]) -> Callable[[Run], float | None]:
    """A run's ``train_info`` field (``info_getter(lambda i: i.adapter_bytes)``; None when absent or not a number)."""
    return lambda run: number(field_of(run.info))


def epoch_seconds(run: Run) -> float | None:
    """Mean wall time of the finished epochs (train time / epochs when none finished, e.g. a short max_steps run)."""
    info = run.info
    if info.epoch_seconds:
        return statistics.fmean(info.epoch_seconds)
    seconds, epochs = number(info.train_seconds), number(info.epochs_completed)
    return seconds / epochs if seconds is not None and epochs else None


def metric_names(groups: list[Group], split: str) -> list[str]:
    """Numeric task metrics present in any run (known ones first, in METRIC_ORDER), without counts like
    ``n_examples`` or ``predicted/<label>``."""
    found: list[str] = []
    for g in groups:
        for run in g.runs:
            for key, value in run.record.scores_of(split).items():
                if key not in found and key != "n_examples" and "/" not in key and number(value) is not None:
                    found.append(key)
    rank = {k: i for i, k in enumerate(METRIC_ORDER)}
    return sorted(found, key=lambda k: (rank.get(k, len(rank)), k))



def _seconds(v: float) -> str:
    return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


def forgetting_delta(run: Run) -> float | None:
    """A run's rise in cross-entropy on out-of-task text (``train_info.forgetting.delta_ce``; None if unmeasured)."""
    record = run.info.forgetting
    return number(record.delta_ce) if record is not None else None


# (header, value of a run, "min" or "max" is best, formatter) for the cost columns after the metrics.
COST_COLUMNS: list[tuple[str, Callable[[Run], float | None], str, Callable[[float], str]]] = [
    ("time/epoch", epoch_seconds, "min", _seconds),
    ("train tok/s", info_getter(lambda i: i.train_tokens_per_s), "max", lambda v: f"{v:,.0f}"),
    ("peak mem", info_getter(lambda i: i.peak_memory_bytes), "min", format_bytes),
    ("adapter", info_getter(lambda i: i.adapter_bytes), "min", format_bytes),
    ("train FLOPs", info_getter(lambda i: i.train_flops_estimate), "min", lambda v: f"{v:.2e}"),
    ("forgetting ΔCE", forgetting_delta, "min", lambda v: f"{v:+.3f}"),
]


SHARED_MARK = " †"


def shared_process(group: Group) -> bool:
    """Some grid run of the group shared its process with earlier runs (or did not record that it had its own),
    so its peak memory includes what they left behind."""
    return any(run.record.grid is not None and run.record.run_info.process != "own" and run.embedded_in is None
               and run.info.peak_memory_bytes is not None for run in group.runs)


def shared_process_note(groups: list[Group]) -> list[Block]:
    """The footnote of the summary's † marks, where there are any."""
    if not any(shared_process(g) for g in groups):
        return []
    return [Para(f"{SHARED_MARK.strip()} Peak memory measured in a grid process that had run other runs before "
                 "(compare ran a grid in one process before 7066679, or with --in-process): it includes what they "
                 "left behind, so it is not comparable between runs.")]


def _mark_best(table: Table, column: int, means: list[float | None], better: str) -> None:
    """Mark every row whose mean equals the column's best (a zero cost never wins)."""
    candidates = [(r, m) for r, m in enumerate(means) if m is not None and (better == "max" or m > 0)]
    if len(candidates) < 2:
        return
    best = (max if better == "max" else min)(m for _, m in candidates)
    winners = {(r, column) for r, m in candidates if math.isclose(m, best, rel_tol=1e-9)}
    if len(winners) < len(candidates):  # a column where every row ties has no best
        table.best |= winners


def summary_table(groups: list[Group], split: str, metrics: list[str]) -> Table:
    """One row per group: metrics as mean ± 95% CI, then trainable parameters and the measured costs."""
    trainable, percent = info_getter(lambda i: i.trainable_params), info_getter(lambda i: i.trainable_percent)
    table = Table(["method", "variant", "N", "seeds", *metrics, "trainable (%)", *(c[0] for c in COST_COLUMNS)], [],
                  css="summary")
    columns: list[list[float | None]] = [[] for _ in range(len(table.headers))]
    for g in groups:
        row = [g.method, g.variant, str(g.n_train), str(len(g.runs))]
        for name in metrics:
            stat = g.stat(metric_getter(split, name))
            columns[len(row)].append(stat.mean if stat else None)
            row.append(stat.text() if stat else "-")
        count, pct = g.stat(trainable), g.stat(percent)
        columns[len(row)].append(count.mean if count and g.n_train else None)  # costs: trained groups compete
        row.append(f"{format_count(int(count.mean))} ({pct.mean:.3g}%)" if count and pct else "-")
        for header, get, _better, fmt in COST_COLUMNS:
            stat = g.stat(get)
            columns[len(row)].append(stat.mean if stat and g.n_train else None)
            mark = SHARED_MARK if header == "peak mem" and stat and shared_process(g) else ""
            row.append(fmt(stat.mean) + mark if stat else "-")  # costs: the mean (a CI is for the task metrics)
        table.rows.append(row)
    betters = ["max"] * len(metrics) + ["min"] + [c[2] for c in COST_COLUMNS]
    for offset, better in enumerate(betters):
        _mark_best(table, 4 + offset, columns[4 + offset], better)
    return table


# ----------------------------------------------------------------------------------------------- sections


def plot_blocks(task: str, groups: list[Group], split: str, metrics: list[str]) -> list[Block]:
    """The task's figures: loss curves, metric bars, metric vs parameters / time, memory, N sweeps, heatmaps."""
    from peftlab.lab import plots

    if not metrics:
        return []
    primary, colors, figures = metrics[0], plots.palette([g.label for g in groups]), []
    scored = [(g, s) for g in groups if (s := g.stat(metric_getter(split, primary))) is not None]
    trained = [g for g in groups if g.runs[0].info.loss_curve or g.runs[0].info.val_curve]
    if len(trained) > MAX_CURVES:  # only the largest N of each variant (groups are sorted by N within a variant)
        trained = list({(g.method, g.variant): g for g in trained}.values())[:MAX_CURVES]
    curves = [plots.CurveSeries.from_train_info(g.label, g.runs[0].info) for g in trained]
    figures.append(("loss", plots.loss_curves(curves, colors), "Train (solid) and validation (dashed) loss of the "
                    "first seed of each group; star: best validation step (weights kept), X: early stop."))
    for name in metrics[:4]:
        stats = [(g.label, s) for g in groups if (s := g.stat(metric_getter(split, name))) is not None]
        figures.append((f"bars-{slug(name)}", plots.metric_bars([lb for lb, _ in stats], [s.mean for _, s in stats],
                        [s.half for _, s in stats], name, colors), f"{name} on {split}: mean over seeds, 95% CI."))
    # Cost plots compare methods on equal data: at the largest N when the grid sweeps N.
    largest = max(g.n_train for g, _ in scored)
    at_n = [(g, s) for g, s in scored if g.n_train == largest]
    where = f" at N={largest}" if len({g.n_train for g, _ in scored if g.n_train}) > 1 else ""
    labels, means, halves = [g.label for g, _ in at_n], [s.mean for _, s in at_n], [s.half for _, s in at_n]

    def cost(field_of: Callable[[TrainInfo], Any]) -> list[float | None]:
        return [st.mean if (st := g.stat(info_getter(field_of))) else None for g, _ in at_n]

    figures.append(("params", plots.metric_vs_cost(labels, cost(lambda i: i.trainable_params), means, halves,
                                                   "trainable parameters", primary, log_x=True, pareto=True,
                                                   colors=colors),
                    f"{primary} vs trainable parameters (log scale){where}; dotted: the Pareto front."))
    figures.append(("time", plots.metric_vs_cost(labels, cost(lambda i: i.train_seconds), means, halves,
                                                 "training time (s)", primary, colors=colors),
                    f"{primary} vs total training time{where}."))
    memory = [(g.label, s.mean) for g in groups
              if (s := g.stat(info_getter(lambda i: i.peak_memory_bytes))) is not None]
    figures.append(("memory", plots.memory_bars([lb for lb, _ in memory], [m for _, m in memory], colors),
                    "Peak memory (CUDA max allocated on GPU, peak RSS of the process on CPU)."))
    sweeps: dict[str, list[tuple[float, float, float | None]]] = {}
    for g, s in scored:
        if g.n_train > 0:
            sweeps.setdefault(g.label.rsplit(" N=", 1)[0], []).append((g.n_train, s.mean, s.half))
    figures.append(("n-sweep", plots.metric_vs_n(sweeps, primary), f"{primary} vs number of training examples."))
    intervals = example_intervals([g for g, _ in scored], split, primary)
    for method in dict.fromkeys(g.method for g, _ in scored if g.n_train > 0):
        sweep = {(g.variant, g.n_train): (s.mean, intervals.get(id(g))) for g, s in scored
                 if g.method == method and g.n_train > 0}
        if len(sweep) < 2:  # one cell is not a sweep
            continue
        rows, cols = sorted({v for v, _ in sweep}, key=_natural), sorted({n for _, n in sweep})
        cells = [[sweep.get((r, c), (None, None)) for c in cols] for r in rows]
        png = plots.heatmap(rows, [str(n) for n in cols], [[mean for mean, _ in row] for row in cells],
                            f"{method}: {primary}", "variant", "N",
                            intervals=[[(iv.low, iv.high) if iv else None for _, iv in row] for row in cells])
        figures.append((f"heatmap-{slug(method)}", png, f"{method}: {primary} (mean over seeds), variant x N; "
                        "under each mean its 95% bootstrap interval over test examples (seeds pooled)."))
    return [Image(f"{slug(task)}-{name}.png", png, caption) for name, png, caption in figures if png is not None]


def lr_pilot_blocks(groups: list[Group]) -> list[Block]:
    """The learning rate each (method, variant) trained at, when a grid's ``lr_pilot`` chose it: every candidate's
    pilot validation loss, the untuned rate and the chosen one."""
    records: dict[tuple[str, str], LrPilot] = {}
    for g in groups:
        for run in g.runs:
            grid = run.record.grid
            if grid is not None and grid.lr_pilot is not None:
                records.setdefault((g.method, g.variant), grid.lr_pilot)
    if not records:
        return []

    def loss(value: Any) -> str:
        return "diverged" if value is None else f"{value:.4f}"

    table = Table(["method", "variant", "untuned lr", "pilots: lr (validation loss)", "chosen lr",
                   "validation loss untuned -> chosen"], [])
    for (method, variant), r in records.items():
        tried = ", ".join(f"{c.lr:.3g} ({loss(c.val_loss)})" for c in r.candidates or [])
        untuned = f"{r.default_lr:.3g}" if r.default_lr is not None else "-"
        table.rows.append([method, variant, untuned, tried, f"{r.chosen_lr:.3g}",
                           f"{loss(r.default_val_loss)} -> {loss(r.chosen_val_loss)}"])
    first = next(iter(records.values()))
    return [Heading(3, "Learning rate per method (lr pilot)"), Para(
        f"Each method trained at the rate whose {first.steps}-step pilot (N={first.n_train}, first "
        f"seed) had the lowest loss on {first.validation_examples} validation examples; the untuned rate is "
        "the grid's own (train.lr or the method's default). The difference between the two losses is what tuning "
        "bought in the pilot."), table]


def sample_blocks(groups: list[Group], split: str) -> list[Block]:
    """A few test examples with each method's output side by side (first seed, largest N per variant)."""
    shown = {(g.method, g.variant): g for g in groups if g.runs[0].record.samples_of(split)}
    if not shown:
        return []
    by_group = {g.label: {str(i if s.id is None else s.id): s
                          for i, s in enumerate(g.runs[0].record.samples_of(split))} for g in shown.values()}
    first = next(iter(by_group.values()))
    blocks: list[Block] = [Heading(3, f"Generated outputs ({split})")]
    for example_id in list(first)[:MAX_SAMPLE_EXAMPLES]:
        sample = first[example_id]
        refs = "\n".join(f"- {ref}" for ref in sample.references or [])
        source = "" if sample.source is None else sample.source
        blocks += [Para(f"Example {example_id}"), Pre(f"SOURCE:\n{source}\n\nREFERENCE:\n{refs}")]
        rows = [[label, str("" if samples[example_id].prediction is None else samples[example_id].prediction)]
                for label, samples in by_group.items() if example_id in samples]
        blocks.append(Table(["method", "prediction"], rows, css="samples"))
    return blocks


def run_blocks(groups: list[Group], root: Path) -> list[Block]:
    """Every run's exact command, seed and commit; versions and machine once per distinct environment."""
    rows, envs = [], {}
    for g in groups:
        for run in g.runs:
            info = run.record.run_info
            if run.embedded_in is not None:
                rows.append([g.label, "-", f"computed inside {run.embedded_in.relative_to(root)}", "-", "-", "-"])
                continue
            env = json.dumps({"versions": info.versions, "machine": info.machine}, indent=1)
            env_number = envs.setdefault(env, len(envs) + 1) if not info.empty else None
            finished = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.finished)) if info.finished is not None \
                else "-"
            rows.append([g.label, str(run.seed), str(run.path.relative_to(root)), info.command or "-",
                         str(info.git_commit or "-"), f"{finished}, env {env_number}" if env_number else finished])
    blocks: list[Block] = [Heading(3, "Runs"),
                           Table(["group", "seed", "file", "command", "git commit", "finished, environment"], rows)]
    for env, env_number in envs.items():
        blocks += [Para(f"Environment {env_number}: versions and machine"), Pre(env)]
    # Predicted (compare's estimate, <task>/estimate/predicted.json) vs actual wall time (finished - started).
    predictions: dict[Path, dict[str, Any]] = {}
    timed = []
    for g in groups:
        for run in g.runs:
            info = run.record.run_info
            if run.path.name != RESULT_NAME:  # <task>/<stem>.json
                folder, stem = run.path.parent, run.path.stem
            elif run.path.parent.parent.name == "runs":  # <task>/runs/<stem>/result.json
                folder, stem = run.path.parents[2], run.path.parent.name
            else:
                continue
            if folder not in predictions:
                file = folder / "estimate" / "predicted.json"
                predictions[folder] = _read_json(file) if file.is_file() else {}
            record = predictions[folder].get(stem)
            p = number(record.get("predicted_seconds")) if isinstance(record, dict) else None
            wall = info.wall_seconds()
            if p is not None and run.embedded_in is None and not info.derived_from and wall is not None:
                timed.append((g.label, run.seed, p, wall, info.cpu_share()))
    if timed:
        table = Table(["group", "seed", "predicted", "actual", "actual / predicted", "CPU share"],
                      [[label, str(seed), _seconds(p), _seconds(a), f"{a / p:.2f}" if p > 0 else "-",
                        f"{share:.0%}" if share is not None else "-"] for label, seed, p, a, share in timed])
        total_p, total_a = sum(t[2] for t in timed), sum(t[3] for t in timed)
        table.rows.append(["total", "", _seconds(total_p), _seconds(total_a),
                           f"{total_a / total_p:.2f}" if total_p > 0 else "-", ""])
        blocks += [Heading(3, "Predicted vs actual time"), Para(
            "Predicted: `peftlab compare`'s estimate before the grid started (calibrated rates x counted tokens); "
            "actual: the run's wall time from its start to its result; CPU share: the CPU time the run's process "
            "used over its wall time times its torch threads (well under 100%: the run shared its cores, so its "
            "times and tokens/s are slower than the machine's own; '-' for results written before it was "
            "recorded)."), table]
    return blocks


def analysis_blocks(root: Path) -> list[Block]:
    """``RESULTS_DIR/analysis/*.png`` and ``*.json`` (written by `peftlab analyze`), when that folder exists."""
    folder = root / "analysis"
    if not folder.is_dir():
        return []
    blocks: list[Block] = [Heading(2, "Analysis")]
    for path in sorted(folder.iterdir()):
        if path.suffix == ".png":
            data = path.read_bytes()
            if not data.startswith(b"\x89PNG\r\n\x1a\n"):
                raise ReportError(f"{path}: not a PNG image (bad signature)")
            blocks.append(Image(f"analysis-{path.name}", data, path.stem))
        elif path.suffix == ".json":
            text = json.dumps(_read_json(path), indent=1)
            blocks += [Para(path.name), Pre(text if len(text) < 6000 else text[:6000] + "\n... (truncated)")]
    return blocks


def build_blocks(root: Path, split: str = "test") -> list[Block]:
    """The whole report as a list of blocks (rendered to Markdown and to HTML)."""
    tasks = group_runs(load_runs(root))
    blocks: list[Block] = [Heading(1, "peftlab report"), Para(
        f"{sum(len(g.runs) for gs in tasks.values() for g in gs)} runs from {root}. Metrics: mean ± 95% confidence "
        "interval (Student t) over seeds; '(1 seed)' = a single run, no interval. Costs: mean over seeds. Bold: "
        "best in its column (costs: among trained groups only).")]
    for task, groups in tasks.items():
        task_split = choose_split(groups, split)
        add_embedded_baselines(groups, task_split)
        metrics = metric_names(groups, task_split)
        summary = with_example_intervals(summary_table(groups, task_split, metrics), groups, task_split, metrics)
        blocks += [Heading(2, f"Task: {task} ({task_split} split)"), summary, *shared_process_note(groups)]
        blocks += significance_blocks(groups, task_split, metrics)  # paired tests over the test examples
        blocks += lr_pilot_blocks(groups)
        blocks += plot_blocks(task, groups, task_split, metrics)
        blocks += sample_blocks(groups, task_split) + run_blocks(groups, root)
    return blocks + analysis_blocks(root)


# ---------------------------------------------------------------------------------------------- output + CLI


def write_report(results_dir: str | Path, out: str | Path | None = None, split: str = "test") -> tuple[Path, Path]:
    """Write ``report.md`` (+ ``report_files/*.png``) and the self-contained ``report.html``.

    Args:
        results_dir: the folder of result files (see the module docstring for the layout).
        out: where to write; default ``results_dir``.
        split: the evaluation split the tables and plots use (a task without it uses the first split it has).

    Returns:
        The paths of report.md and report.html.
    """
    root = Path(results_dir)
    blocks = build_blocks(root, split)
    out_dir = Path(out) if out is not None else root
    files = out_dir / "report_files"
    # Durable writes, the plots first: a report.md/html that exists is complete and its images are there.
    for block in blocks:
        if isinstance(block, Image):
            atomic_write_bytes(files / block.name, block.png)
    md, page = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(md, to_markdown(blocks, files.name))
    atomic_write_text(page, to_html(blocks, f"peftlab report: {root.name}"))
    return md, page


def _cmd_report(ns: argparse.Namespace) -> int:
    md, page = write_report(ns.results_dir, ns.out, ns.split)
    print(f"report: {md}\n        {page}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``peftlab report RESULTS_DIR [--out DIR] [--split SPLIT]`` to the CLI's subparsers."""
    text = "build report.md and a self-contained report.html (tables, plots, samples) from a results folder"
    p = subparsers.add_parser("report", help=text, description=text)
    p.add_argument("results_dir", metavar="RESULTS_DIR",
                   help="folder of <task>/<method>--<variant>--n<N>--seed<k>.json files and/or run folders")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default: RESULTS_DIR)")
    p.add_argument("--split", default="test", help="evaluation split to report (default: test)")
    p.set_defaults(func=_cmd_report)
    return p
