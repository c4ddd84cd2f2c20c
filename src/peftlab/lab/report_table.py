"""The summary table of a report (:mod:`peftlab.lab.report`): one row per group, the task metrics as mean ± 95%
interval over seeds, then trainable parameters and the measured costs (time per epoch, tokens/s, peak memory,
adapter size, FLOPs, forgetting), the best of each column marked; peak memory measured in a shared grid process
carries a † and a footnote."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from peftlab.lab.report_render import Block, Para, Table
from peftlab.lab.report_runs import Group, Run
from peftlab.lab.result_record import TrainInfo, number
from peftlab.lab.table import METRIC_ORDER, format_bytes, format_count


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



def format_seconds(v: float) -> str:
    return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


def forgetting_delta(run: Run) -> float | None:
    """A run's rise in cross-entropy on out-of-task text (``train_info.forgetting.delta_ce``; None if unmeasured)."""
    record = run.info.forgetting
    return number(record.delta_ce) if record is not None else None


# (header, value of a run, "min" or "max" is best, formatter) for the cost columns after the metrics.
COST_COLUMNS: list[tuple[str, Callable[[Run], float | None], str, Callable[[float], str]]] = [
    ("time/epoch", epoch_seconds, "min", format_seconds),
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

