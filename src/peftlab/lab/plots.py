"""The report's plots: each function takes plain numbers and returns one PNG (bytes), or None when there is nothing
to draw.

Figures are built with ``matplotlib.figure.Figure`` directly (the Agg renderer, no pyplot): no global figure state,
no GUI backend, safe to call from any thread or a headless machine.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # in case pyplot is imported elsewhere in the same process: never a GUI backend

from matplotlib.figure import Figure  # noqa: E402

if TYPE_CHECKING:
    from peftlab.lab.result_record import TrainInfo

DPI = 100
Colors = dict[str, tuple[float, float, float, float]]


@dataclass
class CurveSeries:
    """One run's training record: ``train``/``val`` are (step, loss) points; steps of the best / early-stop point."""

    label: str
    train: list[tuple[float, float]] = field(default_factory=list)
    val: list[tuple[float, float]] = field(default_factory=list)
    best_step: float | None = None
    early_stop_step: float | None = None

    @classmethod
    def from_train_info(cls, label: str, info: TrainInfo) -> CurveSeries:
        """From a result's ``train_info``: ``loss_curve`` [[step, loss]], ``val_curve`` [{step, loss, ...}]."""
        train = [(p[0], p[1]) for p in info.loss_curve or []]
        val = [(point.step, point.loss) for point in info.val_curve or [] if point.loss is not None]
        return cls(label, train, val, info.best_step, info.early_stop_step)


def palette(labels: Sequence[str]) -> Colors:
    """One fixed colour per label, so a method looks the same in every figure of a report."""
    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _figure(width: float = 7.0, height: float = 4.0) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height))
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3)
    return fig, ax


def _val_loss_at(val: list[tuple[float, float]], step: float) -> float | None:
    """The validation loss recorded at ``step`` (or the last one before it)."""
    before = [loss for s, loss in val if s <= step]
    return before[-1] if before else None


def loss_curves(series: Sequence[CurveSeries], colors: Colors | None = None) -> bytes | None:
    """Train (solid) and validation (dashed) loss of every series on one axis.

    A star marks the best validation step (the weights kept); an X marks where early stopping ended training.
    """
    if not any(s.train or s.val for s in series):
        return None
    fig, ax = _figure(8.0, 4.5)
    colors = colors or palette([s.label for s in series])
    for s in series:
        color = colors.get(s.label, "grey")
        if s.train:
            ax.plot(*zip(*s.train, strict=True), color=color, lw=1.4, label=s.label)
        if s.val:
            ax.plot(*zip(*s.val, strict=True), color=color, lw=1.4, ls="--", marker="o", ms=3,
                    label=None if s.train else s.label)
        for step, marker, size in ((s.best_step, "*", 14), (s.early_stop_step, "X", 10)):
            loss = _val_loss_at(s.val, step) if step is not None else None
            if loss is not None:
                ax.plot([step], [loss], marker=marker, ms=size, color=color, mec="black", ls="none")
    ax.plot([], [], color="grey", lw=1.4, label="train loss (solid)")
    ax.plot([], [], color="grey", lw=1.4, ls="--", marker="o", ms=3, label="validation loss (dashed)")
    ax.plot([], [], marker="*", ms=12, color="grey", mec="black", ls="none", label="best validation step")
    ax.plot([], [], marker="X", ms=9, color="grey", mec="black", ls="none", label="early stop")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (target tokens)")
    ax.set_title("Training and validation loss")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def metric_bars(labels: Sequence[str], means: Sequence[float], halves: Sequence[float | None], metric: str,
                colors: Colors | None = None) -> bytes | None:
    """One bar per group with its 95% confidence interval as error bar (none for a single seed)."""
    if not labels:
        return None
    fig, ax = _figure(max(5.0, 0.6 * len(labels) + 2), 4.0)
    colors = colors or palette(labels)
    ax.bar(range(len(labels)), means, color=[colors.get(label, "grey") for label in labels])
    with_ci = [i for i, h in enumerate(halves) if h is not None]
    ax.errorbar(with_ci, [means[i] for i in with_ci], yerr=[halves[i] for i in with_ci], fmt="none", capsize=4,
                ecolor="black")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} (mean over seeds, 95% CI)")
    return _png(fig)


def pareto_front(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats: lower (or equal) x and higher (or equal) y, one strictly.

    Returned sorted by x, so they can be joined into the front's step line.
    """
    order = sorted(range(len(xs)), key=lambda i: (xs[i], -ys[i]))
    front, best_y = [], -math.inf
    for i in order:
        if ys[i] > best_y:
            front.append(i)
            best_y = ys[i]
    return front


def metric_vs_cost(labels: Sequence[str], xs: Sequence[float | None], ys: Sequence[float],
                   yerr: Sequence[float | None], xlabel: str, metric: str, log_x: bool = False, pareto: bool = False,
                   colors: Colors | None = None) -> bytes | None:
    """A scatter of ``metric`` against a cost (trainable parameters, time), optionally with the Pareto front."""
    points = [(label, x, y, e) for label, x, y, e in zip(labels, xs, ys, yerr, strict=True)
              if x is not None and y is not None and (x > 0 or not log_x)]
    if not points:
        return None
    fig, ax = _figure(7.0, 4.5)
    colors = colors or palette(labels)
    for label, x, y, e in points:
        ax.errorbar([x], [y], yerr=None if e is None else [e], fmt="o", ms=7, capsize=3,
                    color=colors.get(label, "grey"), label=label)
    if pareto and len(points) > 1:
        front = pareto_front([p[1] for p in points], [p[2] for p in points])
        ax.step([points[i][1] for i in front], [points[i][2] for i in front], where="post", color="black",
                lw=1.0, ls=":", label="Pareto front")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {xlabel}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def memory_bars(labels: Sequence[str], peak_bytes: Sequence[float | None],
                colors: Colors | None = None) -> bytes | None:
    """Peak memory per group in MiB (what each run measured: CUDA max allocated or the CPU peak RSS)."""
    pairs = [(label, b) for label, b in zip(labels, peak_bytes, strict=True) if b is not None]
    if not pairs:
        return None
    fig, ax = _figure(max(5.0, 0.6 * len(pairs) + 2), 4.0)
    colors = colors or palette(labels)
    ax.bar(range(len(pairs)), [b / 2**20 for _, b in pairs], color=[colors.get(label, "grey") for label, _ in pairs])
    ax.set_xticks(range(len(pairs)), [label for label, _ in pairs], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("peak memory (MiB)")
    ax.set_title("Peak memory")
    return _png(fig)


def metric_vs_n(series: dict[str, list[tuple[float, float, float | None]]], metric: str) -> bytes | None:
    """``metric`` against the number of training examples: one line (mean, CI band as error bars) per series."""
    series = {k: sorted(v) for k, v in series.items() if len(v) > 1}
    if not series:
        return None
    fig, ax = _figure(7.0, 4.5)
    all_n = sorted({n for points in series.values() for n, _, _ in points})
    colors = palette(list(series))
    for label, points in series.items():
        ax.plot([n for n, _, _ in points], [m for _, m, _ in points], marker="o", color=colors[label], label=label)
        with_ci = [(n, m, h) for n, m, h in points if h is not None]
        if with_ci:
            ax.errorbar([n for n, _, _ in with_ci], [m for _, m, _ in with_ci], yerr=[h for _, _, h in with_ci],
                        fmt="none", capsize=3, ecolor=colors[label])
    if all_n[0] > 0 and all_n[-1] / all_n[0] >= 10:  # a sweep over orders of magnitude reads best on a log axis
        ax.set_xscale("log")
    ax.set_xlabel("training examples (N)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs N")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def heatmap(row_labels: Sequence[str], col_labels: Sequence[str], values: Sequence[Sequence[float | None]],
            title: str, row_name: str, col_name: str,
            intervals: Sequence[Sequence[tuple[float, float] | None]] | None = None) -> bytes | None:
    """A two-factor sweep (e.g. virtual tokens x N) as a heatmap; missing cells stay blank. ``intervals``: per cell
    an optional (low, high), written under the cell's value."""
    if len(row_labels) < 2 or len(col_labels) < 2:
        return None
    grid = [[math.nan if v is None else v for v in row] for row in values]
    fig = Figure(figsize=(max(4.5, 0.9 * len(col_labels) + 2.5), max(3.0, 0.5 * len(row_labels) + 1.5)))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax)
    finite = [v for row in grid for v in row if not math.isnan(v)]
    middle = (min(finite) + max(finite)) / 2 if finite else 0.0
    for r, row in enumerate(grid):
        for c, v in enumerate(row):
            if not math.isnan(v):  # dark text on the bright (high) end of viridis, light text on the dark end
                interval = intervals[r][c] if intervals is not None else None
                text = f"{v:.2f}" if interval is None else f"{v:.2f}\n[{interval[0]:.1f}, {interval[1]:.1f}]"
                ax.text(c, r, text, ha="center", va="center", fontsize=8,
                        color="black" if v > middle else "white")
    ax.set_xticks(range(len(col_labels)), col_labels)
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel(col_name)
    ax.set_ylabel(row_name)
    ax.set_title(title)
    return _png(fig)
