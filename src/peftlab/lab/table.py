"""A plain-text comparison table of run results (what `peftlab train/eval/demo` print)."""

from __future__ import annotations

from peftlab.lab.result_record import ResultRecord

# Metrics shown when present, in this order.
METRIC_ORDER = ("bleu", "rougeL", "rouge1", "rouge2", "rougeLsum", "accuracy", "macro_f1")


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}GB"


def format_count(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def result_row(result: ResultRecord, split: str = "test") -> dict[str, str]:
    """The table cells of one result."""
    info = result.train_info
    scores, metrics = result.scores_of(split), result.split_metrics(split)
    row = {"method": info.method_name or "?"}
    for key in METRIC_ORDER:
        if key in scores:
            row[key] = f"{scores[key]:.2f}"
    row["trainable"] = f"{format_count(info.trainable_params or 0)} ({info.trainable_percent or 0:.3f}%)"
    row["train time"] = f"{info.train_seconds:.0f}s" if info.train_seconds is not None else "-"
    row["tok/s"] = f"{info.train_tokens_per_s:.0f}" if info.train_tokens_per_s is not None else "-"
    row["peak mem"] = format_bytes(info.peak_memory_bytes)
    row["n"] = str(metrics.n_examples if metrics is not None and metrics.n_examples is not None else "-")
    return row


def format_table(results: list[ResultRecord], split: str = "test", markdown: bool = False,
                 labels: list[str] | None = None) -> str:
    """Rows = runs, columns = the metrics any run has, then cost columns; baselines (e.g. lead-3) get rows too.

    ``markdown=True`` gives a Markdown table (for BENCHMARKS.md) instead of aligned plain text; ``labels`` name the
    rows (default: each run's method name, which does not tell two variants of one method apart).
    """
    rows = [result_row(r, split) for r in results]
    for row, label in zip(rows, labels or [], strict=False):
        row["method"] = label
    for r in results:
        for name, values in r.baselines_of(split).items():
            if not any(row["method"] == name for row in rows):
                rows.append({"method": name, **{k: f"{v:.2f}" for k, v in values.items() if k in METRIC_ORDER}})
    columns = ["method"] + [k for k in METRIC_ORDER if any(k in row for row in rows)]
    columns += ["trainable", "train time", "tok/s", "peak mem", "n"]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(row.get(c, "-") for c in columns) + " |" for row in rows]
        return "\n".join(lines)
    widths = {c: max(len(c), *(len(row.get(c, "-")) for row in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(row.get(c, "-").ljust(widths[c]) for c in columns) for row in rows]
    return "\n".join(lines)
