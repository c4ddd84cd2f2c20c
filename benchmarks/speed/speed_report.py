"""Turn worker records into the benchmark's numbers: planned work, FLOP rates against the matmul ceiling,
per-(workload, method) medians with their min-max range, paired ratios, and the Markdown tables the harness prints.

Ratios are taken two ways: of the variants' median tok/s, and per repeat (the runs of one repeat ran back to back,
so they share the machine's state; see ``harness.run_order``) with the median of those pairs as the headline.
"""

from __future__ import annotations

import statistics
from typing import Any

from speed_common import VARIANT_LETTERS, VARIANTS, training_flops

IGNORE_INDEX = -100
GB = 1e9


def planned_work(data: dict[str, Any], warmup: int, steps: int) -> dict[str, int]:
    """What the measured window must contain: real tokens, target tokens and the sum of squared lengths of the
    batches ``warmup .. warmup + steps - 1`` of the plan (step k trains on batch k - 1)."""
    window = data["batches"][warmup:warmup + steps]
    lengths = [len(data["examples"][i]["input_ids"]) for batch in window for i in batch]
    labels = [data["examples"][i]["labels"] for batch in window for i in batch]
    targets = sum(sum(1 for y in row if y != IGNORE_INDEX) for row in labels)
    return {"real_tokens": sum(lengths), "target_tokens": targets, "attn_sq": sum(n * n for n in lengths),
            "examples": len(lengths)}


def add_flops(record: dict[str, Any], planned: dict[str, int], ceiling_gflops: float | None) -> None:
    """Add useful / executed GFLOP/s (and their share of the ceiling) and the plan check to a worker record.

    Useful FLOPs: the work any implementation must do for the planned real tokens (body on real tokens, head on
    target tokens only, causal attention on real lengths). Executed FLOPs: the work this variant did, from its
    counters (padding, soft-prompt positions, head rows over every position). Both use :func:`training_flops`.
    """
    seconds = max(record["seconds"], 1e-9)
    useful = training_flops(record, planned["real_tokens"], planned["target_tokens"], planned["attn_sq"])
    executed = training_flops(record, record["positions"], record["head_rows"], record["attn_sq"])
    record["planned_real_tokens"] = planned["real_tokens"]
    record["tokens_match_plan"] = (record["real_tokens"] == planned["real_tokens"]
                                   and record["target_tokens"] == planned["target_tokens"])
    record["useful_gflops_per_s"] = useful / seconds / 1e9
    record["executed_gflops_per_s"] = executed / seconds / 1e9
    record["executed_over_useful"] = executed / max(useful, 1.0)
    record["positions_per_real_token"] = record["positions"] / max(record["real_tokens"], 1)
    record["head_rows_per_real_token"] = record["head_rows"] / max(record["real_tokens"], 1)
    if ceiling_gflops:
        record["mfu"] = record["useful_gflops_per_s"] / ceiling_gflops
        record["executed_share_of_ceiling"] = record["executed_gflops_per_s"] / ceiling_gflops


# (numerator, denominator) variants of every ratio reported: peftlab against each baseline, and what the expert
# set-up gains over the plain Trainer.
RATIO_PAIRS = (("peftlab", "trainer"), ("peftlab", "trainer-expert"), ("peftlab", "course"),
               ("trainer-expert", "trainer"), ("peftlab-compile", "peftlab"), ("peftlab-compile", "trainer"),
               ("peftlab-compile", "trainer-expert"))
SUMMARY_KEYS = ("tokens_per_s", "peak_memory_bytes", "train_peak_over_loaded_bytes", "useful_gflops_per_s",
                "executed_gflops_per_s", "mfu", "executed_share_of_ceiling", "positions_per_real_token",
                "head_rows_per_real_token", "real_tokens")


def ratio_name(numerator: str, denominator: str) -> str:
    """``a/b``-style label of a ratio (``b'`` is the expert Trainer set-up)."""
    return f"{VARIANT_LETTERS[numerator]}/{VARIANT_LETTERS[denominator]}"


def spread(values: list[float]) -> dict[str, float] | None:
    """Median, minimum and maximum of some values (None when there are none)."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _median(records: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def pair_ratios(records: list[dict[str, Any]], numerator: str, denominator: str,
                key: str = "tokens_per_s") -> list[float]:
    """``key`` of ``numerator`` over ``denominator`` for every repeat in which both ran without error, by repeat."""
    by_repeat: dict[int, dict[str, float]] = {}
    for r in records:
        if "error" not in r and r.get(key):
            by_repeat.setdefault(r["repeat"], {})[r["variant"]] = r[key]
    return [runs[numerator] / runs[denominator] for _, runs in sorted(by_repeat.items())
            if numerator in runs and denominator in runs]


def ratio_summary(records: list[dict[str, Any]], numerator: str, denominator: str) -> dict[str, Any] | None:
    """Per-repeat tok/s ratios, their median, and the ratio of the two variants' medians (None if one is missing)."""
    pairs = pair_ratios(records, numerator, denominator)
    num = _median([r for r in records if r["variant"] == numerator and "error" not in r], "tokens_per_s")
    den = _median([r for r in records if r["variant"] == denominator and "error" not in r], "tokens_per_s")
    if not pairs or not num or not den:
        return None
    return {"pairs": pairs, "median_of_pairs": statistics.median(pairs), "of_medians": num / den}


def variant_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the runs of one variant, the tok/s range and the median step time (all steps of all runs)."""
    ok = [r for r in runs if "error" not in r]
    steps = [t for r in ok for t in r.get("step_seconds", [])]
    return {"runs": len(ok), "errors": [r["error"] for r in runs if "error" in r],
            **{key: _median(ok, key) for key in SUMMARY_KEYS},
            "tokens_per_s_range": spread([r["tokens_per_s"] for r in ok]),
            "step_seconds": spread(steps),
            "tokens_match_plan": all(r["tokens_match_plan"] for r in ok) if ok else None}


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (workload, method): per-variant medians and ranges, every ratio in ``RATIO_PAIRS``, checks.

    ``a_over_b`` / ``a_over_c`` (the published table's columns) are ratios of the medians; ``ratios`` holds every
    pair with its per-repeat values and their median.
    """
    keys = list(dict.fromkeys((r["workload"], r["method"]) for r in records))
    rows = []
    for workload, method in keys:
        mine = [r for r in records if (r["workload"], r["method"]) == (workload, method)]
        row: dict[str, Any] = {"workload": workload, "method": method, "variants": {
            v: variant_summary([r for r in mine if r["variant"] == v]) for v in VARIANTS
            if any(r["variant"] == v for r in mine)}}
        row["ratios"] = {ratio_name(n, d): ratio_summary(mine, n, d) for n, d in RATIO_PAIRS}
        for name, label in (("a_over_b", "a/b"), ("a_over_b_expert", "a/b'"), ("a_over_c", "a/c")):
            row[name] = row["ratios"][label]["of_medians"] if row["ratios"][label] else None
        memory = {v: s["peak_memory_bytes"] for v, s in row["variants"].items() if s["peak_memory_bytes"]}
        row["memory_ratios"] = {ratio_name(n, d): memory[n] / memory[d] for n, d in RATIO_PAIRS
                                if n in memory and d in memory}
        seen = {s["real_tokens"] for s in row["variants"].values() if s["real_tokens"] is not None}
        row["same_real_tokens"] = len(seen) == 1
        rows.append(row)
    return rows


def _fmt(value: float | None, spec: str = ".0f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value / GB:.2f}"


def _range(values: dict[str, float] | None, spec: str) -> str:
    """``median (min-max)``, or ``-``."""
    if not values:
        return "-"
    return f"{values['median']:{spec}} ({values['min']:{spec}}-{values['max']:{spec}})"


def _ratio_cell(ratio: dict[str, Any] | None) -> str:
    """Median of the per-repeat ratios, then the ratios themselves by repeat."""
    if not ratio:
        return "-"
    return f"{ratio['median_of_pairs']:.2f}x [" + ", ".join(f"{x:.2f}" for x in ratio["pairs"]) + "]"


def _header(first: list[str], rest: list[str]) -> list[str]:
    cells = first + rest
    return ["| " + " | ".join(cells) + " |", "|" + "---|" * len(cells)]


def _variant_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The variants present in any row, in harness order."""
    return [v for v in VARIANTS if any(v in row["variants"] for row in rows)]


def _throughput_table(rows: list[dict[str, Any]], variants: list[str]) -> list[str]:
    ratios = [ratio_name(n, d) for n, d in RATIO_PAIRS if n in variants and d in variants]
    lines = _header(["workload", "method"], [f"({VARIANT_LETTERS[v]}) {v} tok/s" for v in variants] + ratios)
    for row in rows:
        cells = [_range(row["variants"].get(v, {}).get("tokens_per_s_range"), ".1f") for v in variants]
        cells += [_ratio_cell(row["ratios"].get(name)) for name in ratios]
        lines.append(f"| {row['workload']} | {row['method']} | " + " | ".join(cells) + " |")
    return lines


def _step_table(rows: list[dict[str, Any]], variants: list[str]) -> list[str]:
    lines = _header(["workload", "method"], [f"({VARIANT_LETTERS[v]}) s/step" for v in variants])
    for row in rows:
        cells = [_range(row["variants"].get(v, {}).get("step_seconds"), ".3f") for v in variants]
        lines.append(f"| {row['workload']} | {row['method']} | " + " | ".join(cells) + " |")
    return lines


def _memory_table(rows: list[dict[str, Any]], variants: list[str]) -> list[str]:
    ratios = [ratio_name("peftlab", d) for d in ("trainer", "trainer-expert")
              if "peftlab" in variants and d in variants]
    lines = _header(["workload", "method"], [f"({VARIANT_LETTERS[v]}) {v}" for v in variants] + ratios)
    for row in rows:
        cells = []
        for name in variants:
            s = row["variants"].get(name, {})
            cells.append(f"{_gb(s.get('peak_memory_bytes'))} (+{_gb(s.get('train_peak_over_loaded_bytes'))})"
                         if s.get("peak_memory_bytes") else "-")
        cells += [_fmt(row["memory_ratios"].get(name), ".2f") for name in ratios]
        lines.append(f"| {row['workload']} | {row['method']} | " + " | ".join(cells) + " |")
    return lines


def _flops_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = _header(["workload", "method", "variant"], [
        "tok/s", "positions / real token", "head rows / real token", "useful GFLOP/s", "MFU", "executed GFLOP/s",
        "executed / ceiling"])
    for row in rows:
        for name, s in row["variants"].items():
            lines.append(f"| {row['workload']} | {row['method']} | {name} | {_fmt(s['tokens_per_s'], '.1f')} | "
                         f"{_fmt(s['positions_per_real_token'], '.2f')} | {_fmt(s['head_rows_per_real_token'], '.2f')}"
                         f" | {_fmt(s['useful_gflops_per_s'], '.1f')} | {_pct(s['mfu'])} | "
                         f"{_fmt(s['executed_gflops_per_s'], '.1f')} | {_pct(s['executed_share_of_ceiling'])} |")
    return lines


def markdown(rows: list[dict[str, Any]], ceiling: dict[str, Any] | None) -> str:
    """The tables: throughput with ratios, step times, peak memory, and where the FLOPs go."""
    variants = _variant_columns(rows)
    lines = ["tok/s of real tokens: median over the repeats (min-max). Ratios: median of the per-repeat ratios "
             "[each repeat's ratio, by repeat]; (b') is the Trainer with the head on labelled positions only.", "",
             *_throughput_table(rows, variants),
             "", "Seconds per measured optimizer step: median over every step of every repeat (min-max):", "",
             *_step_table(rows, variants),
             "", "Peak memory in GB during training, median over the repeats (in brackets: above the memory held "
             "once the model and data were loaded); ratios of the medians:", "",
             *_memory_table(rows, variants),
             "", _ceiling_line(ceiling), "", *_flops_table(rows)]
    lines += _warnings(rows)
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ceiling_line(ceiling: dict[str, Any] | None) -> str:
    if not ceiling:
        return "Matmul ceiling: not measured."
    rounds = ", ".join(f"{c['gflops']:.1f}" for c in ceiling["measurements"])
    first = ceiling["measurements"][0]
    return (f"Matmul ceiling: {ceiling['gflops']:.1f} GFLOP/s ({first['dtype']} {first['size']}^3 matmul on "
            f"{first['device']}, {first['threads']} threads; measured before and after the runs: {rounds}).")


def _warnings(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for row in rows:
        where = f"{row['workload']} {row['method']}"
        for name, s in row["variants"].items():
            if s["errors"]:
                out.append(f"- {where} {name}: {len(s['errors'])} run(s) failed: {s['errors'][0][-300:]}")
            if s["tokens_match_plan"] is False:
                out.append(f"- {where} {name}: the measured window did not hold the planned batches")
        if not row["same_real_tokens"]:
            out.append(f"- {where}: the variants saw different numbers of real tokens")
    return ["", "Problems:", *out] if out else []
