"""Turn worker records into the benchmark's numbers: planned work, FLOP rates against the matmul ceiling,
per-(workload, method) medians and ratios, and the Markdown tables the harness prints.
"""

from __future__ import annotations

import statistics
from typing import Any

from speed_common import VARIANTS, training_flops

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


def _median(records: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (workload, method): per-variant medians over repeats, ratios a/b and a/c, token checks."""
    keys = list(dict.fromkeys((r["workload"], r["method"]) for r in records))
    rows = []
    for workload, method in keys:
        row: dict[str, Any] = {"workload": workload, "method": method, "variants": {}}
        for variant in VARIANTS:
            runs = [r for r in records if (r["workload"], r["method"], r["variant"]) == (workload, method, variant)]
            ok = [r for r in runs if "error" not in r]
            if not runs:
                continue
            row["variants"][variant] = {
                "runs": len(ok), "errors": [r["error"] for r in runs if "error" in r],
                **{key: _median(ok, key) for key in (
                    "tokens_per_s", "peak_memory_bytes", "train_peak_over_loaded_bytes", "useful_gflops_per_s",
                    "executed_gflops_per_s", "mfu", "executed_share_of_ceiling", "positions_per_real_token",
                    "head_rows_per_real_token", "real_tokens")},
                "tokens_match_plan": all(r["tokens_match_plan"] for r in ok) if ok else None,
            }
        speed = {v: s["tokens_per_s"] for v, s in row["variants"].items() if s["tokens_per_s"]}
        if "peftlab" in speed:
            row["a_over_b"] = speed["peftlab"] / speed["trainer"] if "trainer" in speed else None
            row["a_over_c"] = speed["peftlab"] / speed["course"] if "course" in speed else None
        seen = {s["real_tokens"] for s in row["variants"].values() if s["real_tokens"] is not None}
        row["same_real_tokens"] = len(seen) == 1
        rows.append(row)
    return rows


def _fmt(value: float | None, spec: str = ".0f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value / GB:.2f}"


def markdown(rows: list[dict[str, Any]], ceiling: dict[str, Any] | None) -> str:
    """The three tables: throughput with ratios, peak memory, and where the FLOPs go."""
    lines = ["| workload | method | peftlab tok/s | trainer tok/s | course tok/s | a/b | a/c |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        v = row["variants"]
        lines.append(f"| {row['workload']} | {row['method']} | "
                     + " | ".join(_fmt(v.get(name, {}).get("tokens_per_s"), ".1f") for name in VARIANTS)
                     + f" | {_fmt(row.get('a_over_b'), '.2f', 'x')} | {_fmt(row.get('a_over_c'), '.2f', 'x')} |")
    lines += ["", "Peak memory in GB during training (in brackets: above the memory held once the model and data "
              "were loaded):", "",
              "| workload | method | peftlab | trainer | course |", "|---|---|---|---|---|"]
    for row in rows:
        cells = []
        for name in VARIANTS:
            s = row["variants"].get(name, {})
            cells.append(f"{_gb(s.get('peak_memory_bytes'))} (+{_gb(s.get('train_peak_over_loaded_bytes'))})"
                         if s.get("peak_memory_bytes") else "-")
        lines.append(f"| {row['workload']} | {row['method']} | " + " | ".join(cells) + " |")
    lines += ["", _ceiling_line(ceiling), "",
              "| workload | method | variant | tok/s | positions / real token | head rows / real token | useful "
              "GFLOP/s | MFU | executed GFLOP/s | executed / ceiling |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for name, s in row["variants"].items():
            lines.append(f"| {row['workload']} | {row['method']} | {name} | {_fmt(s['tokens_per_s'], '.1f')} | "
                         f"{_fmt(s['positions_per_real_token'], '.2f')} | {_fmt(s['head_rows_per_real_token'], '.2f')}"
                         f" | {_fmt(s['useful_gflops_per_s'], '.1f')} | {_pct(s['mfu'])} | "
                         f"{_fmt(s['executed_gflops_per_s'], '.1f')} | {_pct(s['executed_share_of_ceiling'])} |")
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
