"""Paired significance between grid cells over the test examples they share, from the per-example records of
result files (``per_example[split]``, see :mod:`peftlab.lab.result_record`).

A *cell* is the runs of one (method, variant, N) group over its seeds. Every metric is a function of per-example
statistics summed over examples and seeds, so one resample of the examples (a row of counts) scores every cell
by a matrix product, and all pairs of a table share the same resamples:

* accuracy: ``[correct, 1]`` per example and seed -> 100 * sum(correct) / sum(1) (the mean over seeds of each
  example's score, averaged over examples);
* ROUGE (``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum``): ``[score, 1]`` -> the mean score;
* macro-F1: per label ``[tp, fp, fn]`` -> the mean of 2 tp / (2 tp + fp + fn) over the labels (seeds pooled);
* BLEU: sacrebleu's ``[sys_len, ref_len, correct1..4, total1..4]`` -> corpus BLEU of the sums (seeds pooled).

Paired bootstrap (Koehn 2004; Berg-Kirkpatrick et al. 2012): resample the shared examples with replacement ``B``
times (a fixed seed, so a report is reproducible); the difference's 95% interval is the 2.5/97.5 percentiles of
the resampled differences, and the two-sided p-value is ``(1 + #{|d* - d| >= |d|}) / (B + 1)`` (how often a
resample lands at least as far from the observed difference ``d`` as ``d`` is from 0), so its floor is
``1 / (B + 1)``. Accuracy between two single-seed cells also gets McNemar's exact test (a binomial test on the
examples where exactly one of the two is right). Within a table, p-values are corrected with Holm's step-down
method. These are intervals over test examples for fixed trained models; the report's seed intervals are over
training randomness.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from peftlab.lab.report_render import Block, Heading, Para, Table
from peftlab.lab.result_record import SplitRecords
from peftlab.tasks.base import unpack_numbers

if TYPE_CHECKING:
    from peftlab.lab.report_runs import Group, Run

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
ALPHA = 0.05
ROUGE_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
BLEU_WIDTH = 10  # [sys_len, ref_len, correct1..4, total1..4]


class SignificanceError(ValueError):
    """Cells that cannot be compared (different test examples, malformed records); the message says which."""


@dataclass
class Cell:
    """One cell's per-example records over its seeds, aligned to ``ids``.

    Attributes:
        label: the cell's name in messages and tables.
        ids: example ids, in the order of every array in ``seeds``.
        seeds: one ``{record name: array of shape (n,) or (n, k)}`` per seed.
        n_labels: the size of the label set (classification), for macro-F1.
    """

    label: str
    ids: list[str]
    seeds: list[dict[str, np.ndarray]]
    n_labels: int | None = None

    @property
    def n(self) -> int:
        return len(self.ids)


def _order(reference: Sequence[str], ids: Sequence[str], what: str, against: str) -> np.ndarray:
    """Indices that put ``ids`` in the order of ``reference``; a clear error when the two sets differ."""
    if list(ids) == list(reference):
        return np.arange(len(ids))
    if set(ids) != set(reference):
        only_here, only_there = sorted(set(ids) - set(reference)), sorted(set(reference) - set(ids))
        raise SignificanceError(
            f"{what} was scored on other test examples than {against} ({len(ids)} vs {len(reference)} examples; "
            f"{len(only_here)} ids only in {what}, e.g. {only_here[:3]}; {len(only_there)} only in {against}, e.g. "
            f"{only_there[:3]}): a paired test needs the same examples (same test split, data.max_test and data)")
    if len(set(ids)) != len(ids) or len(ids) != len(reference):
        raise SignificanceError(f"{what}: repeated example ids in another order than {against}; cannot pair them")
    position = {example_id: i for i, example_id in enumerate(ids)}
    return np.array([position[example_id] for example_id in reference])


def _arrays(records: SplitRecords, what: str) -> tuple[list[str], dict[str, np.ndarray], int | None]:
    """(ids, numeric records as arrays, label count) of one run's ``per_example[split]``."""
    if not isinstance(records.ids, list) or not records.ids:
        raise SignificanceError(f"{what}: per-example records without a list of example ids")
    ids = [str(example_id) for example_id in records.ids]
    arrays: dict[str, np.ndarray] = {}
    for key, value in records.records.items():
        if key == "labels":
            continue
        try:
            values = np.asarray(unpack_numbers(value), dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise SignificanceError(f"{what}: per-example record {key!r} is not numbers ({exc})") from exc
        if values.size % len(ids):
            raise SignificanceError(f"{what}: per-example record {key!r} has {values.size} values for {len(ids)} ids")
        arrays[key] = values.reshape(len(ids), -1) if values.size != len(ids) else values
    labels = records.records.get("labels")
    return ids, arrays, len(labels) if isinstance(labels, list) else None


def _split_records(records: SplitRecords | Mapping[str, Any], what: str) -> SplitRecords:
    if isinstance(records, SplitRecords):
        return records
    if not isinstance(records, Mapping):
        raise SignificanceError(f"{what}: per-example records are not a mapping")
    return SplitRecords.from_dict(records, what)


def make_cell(label: str, seed_records: Sequence[SplitRecords | Mapping[str, Any]]) -> Cell:
    """A cell from the ``per_example[split]`` records of each of its seeds (aligned by example id).

    Args:
        label: the cell's name in messages and tables.
        seed_records: one :class:`SplitRecords` per seed, or its JSON mapping ``{"ids": [...], <record>: ...}``.

    Raises:
        SignificanceError: no records, or seeds scored on different examples.
    """
    if not seed_records:
        raise SignificanceError(f"{label}: no per-example records")
    ids, first, n_labels = _arrays(_split_records(seed_records[0], f"{label} (seed 1)"), f"{label} (seed 1)")
    seeds = [first]
    for k, records in enumerate(seed_records[1:], start=2):
        what = f"{label} (seed {k})"
        other_ids, arrays, other_labels = _arrays(_split_records(records, what), what)
        order = _order(ids, other_ids, f"{label} (seed {k})", f"{label} (seed 1)")
        seeds.append({key: values[order] for key, values in arrays.items()})
        if other_labels is not None:
            n_labels = max(n_labels or 0, other_labels)
    return Cell(label, ids, seeds, n_labels)


def align(cells: Sequence[Cell]) -> list[Cell]:
    """The cells with every record in the first cell's example order.

    Raises:
        SignificanceError: two cells were scored on different examples (the message names both and the ids).
    """
    first = cells[0]
    out = [first]
    for cell in cells[1:]:
        order = _order(first.ids, cell.ids, cell.label, first.label)
        out.append(Cell(cell.label, list(first.ids), [{k: v[order] for k, v in s.items()} for s in cell.seeds],
                        cell.n_labels))
    return out


# --------------------------------------------------------------------------------------------- metric statistics


def available_metrics(cell: Cell) -> list[str]:
    """The metrics this cell's records (in every seed) can be scored on."""
    keys = set.intersection(*(set(seed) for seed in cell.seeds))
    found = []
    if {"predicted", "gold"} <= keys:
        found += ["accuracy", "macro_f1"]
    found += [key for key in ROUGE_METRICS if key in keys]
    if "bleu_stats" in keys:
        found.append("bleu")
    return found


def _n_labels(cell: Cell) -> int:
    seen = max(int(max(s["predicted"].max(), s["gold"].max())) for s in cell.seeds) + 1
    return max(cell.n_labels or 0, seen)


def statistics(cell: Cell, metric: str, n_labels: int | None = None) -> np.ndarray:
    """Per-example sufficient statistics of ``metric``, summed over the cell's seeds: shape (n, k).

    Args:
        cell: the cell.
        metric: one of :func:`available_metrics`.
        n_labels: label-set size for macro-F1 (default: the cell's).
    """
    if metric not in available_metrics(cell):
        raise SignificanceError(f"{cell.label}: no per-example records for {metric!r} "
                                f"(available: {', '.join(available_metrics(cell)) or 'none'})")
    ones = np.full(cell.n, float(len(cell.seeds)))
    if metric == "accuracy":
        correct = sum(s["predicted"] == s["gold"] for s in cell.seeds)
        return np.stack([correct.astype(np.float64), ones], axis=1)
    if metric == "macro_f1":
        columns = []
        for label in range(n_labels or _n_labels(cell)):
            pred, gold = [s["predicted"] == label for s in cell.seeds], [s["gold"] == label for s in cell.seeds]
            columns += [sum(p & g for p, g in zip(pred, gold, strict=True)),
                        sum(p & ~g for p, g in zip(pred, gold, strict=True)),
                        sum(~p & g for p, g in zip(pred, gold, strict=True))]
        return np.stack(columns, axis=1).astype(np.float64)
    if metric == "bleu":
        stats = sum(s["bleu_stats"] for s in cell.seeds)
        if stats.ndim != 2 or stats.shape[1] != BLEU_WIDTH:
            raise SignificanceError(f"{cell.label}: bleu_stats must hold {BLEU_WIDTH} numbers per example")
        return stats
    return np.stack([sum(s[metric] for s in cell.seeds), ones], axis=1)


def bleu_from_sums(sums: np.ndarray) -> np.ndarray:
    """Corpus BLEU of summed statistics ``(..., 10)``, vectorised: sacrebleu's ``compute_bleu`` with its default
    'exp' smoothing (the k-th n-gram order without a match counts as 1 / (2^k total)) and no effective order."""
    sys_len, ref_len = sums[..., 0], sums[..., 1]
    correct, total = sums[..., 2:6], sums[..., 6:10]
    with np.errstate(divide="ignore", invalid="ignore"):
        brevity = np.where(sys_len >= ref_len, 1.0,
                           np.where(sys_len > 0, np.exp(1 - ref_len / np.where(sys_len > 0, sys_len, 1)), 0.0))
        misses = np.cumsum(correct == 0, axis=-1)
        precision = np.where(correct == 0, 100.0 / (2.0**misses * total), 100.0 * correct / total)
        logs = np.log(np.where(total > 0, precision, 1.0))
    # sacrebleu: no match at all, or an order without any n-gram (then its log is -1e10), scores 0.
    scored = (total > 0).all(axis=-1) & (correct > 0).any(axis=-1)
    mean_log = (((logs[..., 0] + logs[..., 1]) + logs[..., 2]) + logs[..., 3]) / 4
    return np.where(scored, brevity * np.exp(mean_log), 0.0)


def metric_from_sums(metric: str, sums: np.ndarray) -> np.ndarray:
    """The metric (x100) of statistics summed over examples: ``(..., k)`` -> ``(...)``."""
    if metric == "bleu":
        return bleu_from_sums(sums)
    if metric == "macro_f1":
        tp, fp, fn = sums[..., 0::3], sums[..., 1::3], sums[..., 2::3]
        denominator = 2 * tp + fp + fn
        with np.errstate(divide="ignore", invalid="ignore"):
            f1 = np.where(denominator > 0, 100.0 * 2 * tp / denominator, 0.0)
        return f1.mean(axis=-1)
    scale = 100.0 if metric == "accuracy" else 1.0  # ROUGE records are already x100
    return scale * sums[..., 0] / sums[..., 1]


@lru_cache(maxsize=8)
def resample_counts(n: int, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray:
    """How often each of ``n`` examples is drawn in each of ``resamples`` bootstrap resamples: (resamples, n).

    Cached (read-only): every cell and pair of a report on the same examples shares one draw.
    """
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    flat = (draws + n * np.arange(resamples)[:, None]).ravel()
    counts = np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(np.float64)
    counts.flags.writeable = False
    return counts


# --------------------------------------------------------------------------------------------------- tests


@dataclass
class Interval:
    """A cell's metric on all its examples and the 95% percentile-bootstrap interval over examples."""

    label: str
    value: float
    low: float
    high: float


@dataclass
class Comparison:
    """Cell ``a`` minus cell ``b`` on the shared examples.

    ``p`` is McNemar's exact p when it applies (accuracy, one seed each), else the bootstrap p; ``p_holm`` and
    ``significant`` are filled by :func:`compare_cells` (Holm over the pairs compared together).
    """

    a: str
    b: str
    metric: str
    n_examples: int
    difference: float
    low: float
    high: float
    p_bootstrap: float
    p_mcnemar: float | None = None
    p_holm: float | None = None
    significant: bool | None = None

    @property
    def p(self) -> float:
        return self.p_mcnemar if self.p_mcnemar is not None else self.p_bootstrap


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p: 2 P(X <= min(b, c)), X ~ Binomial(b + c, 1/2), capped at 1.

    Args:
        only_a: examples that only the first classifier gets right.
        only_b: examples that only the second gets right.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError(f"mcnemar_exact: counts must be >= 0, got {only_a}, {only_b}")
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    term, tail = 1, 1  # C(n, 0); exact integers, so a large n loses no precision
    for i in range(k):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2**n)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone), in the input order."""
    m = len(pvalues)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[index]))
        adjusted[index] = running
    return adjusted


def _single_seed_correct(cell: Cell) -> np.ndarray | None:
    if len(cell.seeds) != 1 or not {"predicted", "gold"} <= set(cell.seeds[0]):
        return None
    return cell.seeds[0]["predicted"] == cell.seeds[0]["gold"]


def compare_cells(cells: Sequence[Cell], metric: str, resamples: int = DEFAULT_RESAMPLES,
                  seed: int = DEFAULT_SEED, alpha: float = ALPHA) -> tuple[list[Interval], list[Comparison]]:
    """Each cell's metric with its 95% interval over examples, and every pair compared (Holm over all pairs).

    Args:
        cells: two or more cells scored on the same examples (aligned by id here).
        metric: a metric every cell's records support (see :func:`available_metrics`).
        resamples: bootstrap resamples (shared by every cell and pair).
        seed: RNG seed of the resamples (fixed: the same results give the same report).
        alpha: level at which a Holm-adjusted p counts as significant.

    Returns:
        (intervals in the order of ``cells``, comparisons for i < j as ``cells[i] - cells[j]``).

    Raises:
        SignificanceError: cells on different examples, or a metric some cell cannot be scored on.
    """
    cells = align(cells)
    n_labels = max((_n_labels(c) for c in cells), default=None) if metric == "macro_f1" else None
    stats = [statistics(c, metric, n_labels) for c in cells]
    counts = resample_counts(cells[0].n, resamples, seed)
    observed = [float(metric_from_sums(metric, s.sum(axis=0))) for s in stats]
    boot = [metric_from_sums(metric, counts @ s) for s in stats]
    intervals = [Interval(c.label, value, *map(float, np.percentile(b, [2.5, 97.5])))
                 for c, value, b in zip(cells, observed, boot, strict=True)]
    comparisons = []
    for i in range(len(cells)):
        for j in range(i + 1, len(cells)):
            d, resampled = observed[i] - observed[j], boot[i] - boot[j]
            p = (1 + int(np.sum(np.abs(resampled - d) >= abs(d) - 1e-12))) / (resamples + 1)
            low, high = np.percentile(resampled, [2.5, 97.5])
            comparison = Comparison(cells[i].label, cells[j].label, metric, cells[0].n, d, float(low), float(high),
                                    min(1.0, p))
            right_i, right_j = _single_seed_correct(cells[i]), _single_seed_correct(cells[j])
            if metric == "accuracy" and right_i is not None and right_j is not None:
                comparison.p_mcnemar = mcnemar_exact(int(np.sum(right_i & ~right_j)), int(np.sum(~right_i & right_j)))
            comparisons.append(comparison)
    for comparison, adjusted in zip(comparisons, holm([c.p for c in comparisons]), strict=True):
        comparison.p_holm, comparison.significant = adjusted, adjusted <= alpha
    return intervals, comparisons


def paired_bootstrap(a: Cell, b: Cell, metric: str, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = DEFAULT_SEED) -> Comparison:
    """``a`` minus ``b`` on their shared examples: difference, 95% CI, bootstrap p (and McNemar's where it applies)."""
    return compare_cells([a, b], metric, resamples, seed)[1][0]


def cell_interval(cell: Cell, metric: str, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Interval:
    """The cell's metric on its examples with the 95% percentile-bootstrap interval over examples."""
    stats = statistics(cell, metric)
    boot = metric_from_sums(metric, resample_counts(cell.n, resamples, seed) @ stats)
    low, high = np.percentile(boot, [2.5, 97.5])
    return Interval(cell.label, float(metric_from_sums(metric, stats.sum(axis=0))), float(low), float(high))


# ------------------------------------------------------------------------------------------------ report section


def _format_p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.3f}" if p >= 0.001 else "<0.001"


def _cell_label(group: Group) -> str:
    return group.method + ("" if group.variant == "default" else f"/{group.variant}")


def _records(run: Run, split: str, groups: Sequence[Group]) -> SplitRecords | None:
    """A run's ``per_example[split]``; for a baseline the report read from another run's metrics, that run's
    records of it (``per_example[split]["baselines"][name]``, with that run's ids)."""
    if run.embedded_in is None:
        return run.record.records_of(split)
    origin = next((r for g in groups for r in g.runs if r.path == run.embedded_in and r.embedded_in is None), None)
    records = origin.record.records_of(split) if origin else None
    return records.baseline(run.method) if records is not None else None


def report_cells(groups: Sequence[Group], split: str) -> tuple[list[tuple[Group, Cell]], list[str]]:
    """The groups whose every seed has per-example records on ``split``, as cells; the others' notes."""
    cells, left_out = [], []
    for group in groups:
        records = [_records(run, split, groups) for run in group.runs]
        if any(r is None for r in records):
            left_out.append(f"{group.label} (no per-example scores in its result files)")
            continue
        try:
            cells.append((group, make_cell(_cell_label(group), records)))
        except SignificanceError as exc:
            left_out.append(f"{group.label} ({exc})")
    return cells, left_out


def _tables(cells: Sequence[tuple[Group, Cell]], metric: str) -> list[tuple[int, list[tuple[Group, Cell]]]]:
    """The significance section's tables: one per training-set size N, holding that N's cells and the baselines'
    (N=0), those with per-example scores of ``metric``."""
    sizes = sorted({g.n_train for g, _ in cells if g.n_train > 0}) or [0]
    return [(n, [(g, c) for g, c in cells if g.n_train in (0, n) and metric in available_metrics(c)]) for n in sizes]


def example_intervals(groups: Sequence[Group], split: str, metric: str, resamples: int = DEFAULT_RESAMPLES,
                      seed: int = DEFAULT_SEED) -> dict[int, Interval]:
    """``id(group) -> interval``: each group's 95% bootstrap interval over test examples (seeds pooled), for the
    groups whose result files hold per-example scores of ``metric``.

    A group's interval uses the resamples of its significance table (:func:`resamples_for`), so the summary and
    the significance section show the same interval; a baseline, which sits in every N's table, takes the largest.
    """
    cells = report_cells(groups, split)[0]
    used: dict[int, int] = {}
    for _, table in _tables(cells, metric):
        count = resamples_for(len(table), resamples)
        for group, _ in table:
            used[id(group)] = max(used.get(id(group), 0), count)
    return {id(group): cell_interval(cell, metric, used[id(group)], seed) for group, cell in cells
            if id(group) in used}


def with_example_intervals(table: Table, groups: Sequence[Group], split: str, metrics: Sequence[str],
                           resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Table:
    """The summary table with a "<primary> 95% CI (examples)" column after the primary metric's: each cell's
    bootstrap interval over test examples (seeds pooled); unchanged when no group has per-example records."""
    if not metrics or metrics[0] not in table.headers:
        return table
    metric = metrics[0]
    intervals = example_intervals(groups, split, metric, resamples, seed)
    texts = [f"[{iv.low:.2f}, {iv.high:.2f}]" if (iv := intervals.get(id(group))) else "-" for group in groups]
    if all(text == "-" for text in texts):
        return table
    at = table.headers.index(metric) + 1
    table.headers.insert(at, f"{metric} 95% CI (examples)")
    for row, text in zip(table.rows, texts, strict=True):
        row.insert(at, text)
    table.best = {(r, c + 1 if c >= at else c) for r, c in table.best}
    return table


def _versus_best(intervals: list[Interval], comparisons: list[Comparison], metric: str) -> Table:
    """One row per cell, best first: its metric and interval, and its difference from the best cell."""
    ranked = sorted(intervals, key=lambda i: -i.value)
    best = ranked[0]
    pairs = {(c.a, c.b): c for c in comparisons}
    table = Table(["cell", metric, "95% CI (examples)", "Δ vs best", "95% CI of Δ", "p (Holm)", "at 0.05"], [],
                  best={(0, 1)})
    for interval in ranked:
        row = [interval.label, f"{interval.value:.2f}", f"[{interval.low:.2f}, {interval.high:.2f}]"]
        if interval is best:
            table.rows.append(row + ["best", "", "", ""])
            continue
        c = pairs.get((interval.label, best.label)) or pairs[(best.label, interval.label)]
        sign = 1 if c.a == interval.label else -1
        low, high = sorted((sign * c.low, sign * c.high))
        table.rows.append(row + [f"{sign * c.difference:+.2f}", f"[{low:+.2f}, {high:+.2f}]", _format_p(c.p_holm),
                                 "significant" if c.significant else "n.s."])
    return table


def _pairwise(intervals: list[Interval], comparisons: list[Comparison]) -> Table:
    """Every pair, the better cell first (a positive difference), ordered by the better cell's rank."""
    rank = {i.label: r for r, i in enumerate(sorted(intervals, key=lambda i: -i.value))}
    mcnemar = any(c.p_mcnemar is not None for c in comparisons)
    table = Table(["A", "B", "Δ (A − B)", "95% CI", "p (bootstrap)", *(["p (McNemar)"] if mcnemar else []),
                   "p (Holm)", "at 0.05"], [])
    rows = []
    for c in comparisons:
        flip = rank[c.a] > rank[c.b]
        a, b, sign = (c.b, c.a, -1) if flip else (c.a, c.b, 1)
        low, high = sorted((sign * c.low, sign * c.high))
        row = [a, b, f"{sign * c.difference:+.2f}", f"[{low:+.2f}, {high:+.2f}]", _format_p(c.p_bootstrap),
               *([_format_p(c.p_mcnemar)] if mcnemar else []), _format_p(c.p_holm),
               "significant" if c.significant else "n.s."]
        rows.append(((rank[a], rank[b]), row))
    table.rows = [row for _, row in sorted(rows, key=lambda item: item[0])]
    return table


def _intro(split: str, metric: str, resamples: int, seed: int) -> Para:
    return Para(
        f"Paired comparisons of {metric} over the {split} examples that both cells were scored on: {resamples:,} "
        f"bootstrap resamples of the examples (RNG seed {seed}, shared by every cell of a table). A cell's score "
        "pools its seeds (per example, the mean over seeds; BLEU: corpus BLEU of every seed's summed statistics). "
        "95% CI: percentile interval; p: two-sided bootstrap p (its floor is 1/(resamples+1)); accuracy between two "
        "single-seed cells also gets McNemar's exact test, whose p is then the one corrected. 'at 0.05': "
        "significant when p after Holm's correction over all pairs of its table (one table per N, baselines "
        "included) is at most 0.05; n.s. = not significant. These intervals are over test examples for the "
        "trained models at hand; the summary's ± intervals are over seeds (training randomness).")


def resamples_for(cells: int, resamples: int = DEFAULT_RESAMPLES, alpha: float = ALPHA) -> int:
    """The resamples a table of ``cells`` gets: ``resamples``, unless its p floor 1/(resamples+1) times the number of
    pairs exceeds ``alpha``, when no pair could pass Holm's correction however large its difference; then
    2 x pairs / alpha (17 cells: 136 pairs, 5,440 resamples)."""
    pairs = cells * (cells - 1) // 2
    if (resamples + 1) * alpha >= pairs:
        return resamples
    return math.ceil(2 * pairs / alpha)


def significance_blocks(groups: Sequence[Group], split: str, metrics: Sequence[str],
                        resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> list[Block]:
    """The report's "Significance" section of one task: per N, every cell against the best and every pair.

    Results without per-example records (written before peftlab stored them) are left out, and the section says
    so; with fewer than two comparable cells it says why it is omitted.
    """
    blocks: list[Block] = [Heading(3, f"Significance ({split} split)")]
    cells, left_out = report_cells(groups, split)
    if not cells:
        return blocks + [Para("Omitted: none of these result files holds per-example scores ('per_example', "
                              "recorded by peftlab since results carry them); rerun the runs to compare them per "
                              "example.")]
    metric = next((m for m in metrics if sum(m in available_metrics(c) for _, c in cells) >= 2), None)
    if metric is None:
        return blocks + [Para("Omitted: fewer than two cells have per-example scores of the same metric.")]
    blocks.append(_intro(split, metric, resamples, seed))
    for n, table in _tables(cells, metric):
        table_cells = [c for _, c in table]
        title = f"N={n}" + (" (and the baselines)" if n and any(g.n_train == 0 for g, _ in cells) else "")
        if len(table_cells) < 2:
            continue
        used = resamples_for(len(table_cells), resamples)
        try:
            intervals, comparisons = compare_cells(table_cells, metric, used, seed)
        except SignificanceError as exc:
            blocks += [Heading(4, title), Para(f"Not compared: {exc}")]
            continue
        blocks.append(Heading(4, title))
        if used != resamples:
            blocks.append(Para(f"This table uses {used:,} resamples: with {len(comparisons)} pairs, the p floor of "
                               f"{resamples:,} (1/{resamples + 1:,}) could not pass Holm's correction."))
        blocks += [_versus_best(intervals, comparisons, metric), _pairwise(intervals, comparisons)]
    if left_out:
        blocks.append(Para("Left out of the comparisons: " + "; ".join(left_out) + "."))
    return blocks
