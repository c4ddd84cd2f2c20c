"""Where one grid run's generation time goes, against what `compare --estimate` predicted for it.

Usage:
    python benchmarks/generation_schedule.py configs/compare/e2e.yaml results=studies \
        [--run zero-shot--default--n0--seed0] [--examples N] [--threads 1] [--cache PATH] [--out JSON]

The run is planned as `compare` plans it and evaluated as `compare` evaluates it (its own model and method: a
zero-shot run the bare base model, a trained run the adapter in ``<results>/<grid>/runs/<stem>/adapter``, merged
where evaluation merges it; the test split as the run reads it, or its first ``--examples``), through the
evaluation's own predictor (continuous batching, precision, batch size), with a timer around every prompt pass
(prefill) and every decode step. It prints:

- what ran: prompt passes by their number of rows (passes, padded positions, seconds, positions/s), decode steps by
  rows (steps, row-steps, seconds, row-steps/s), the rest of the loop (refill copies, bookkeeping), and the
  generated lengths (mean, share that reached ``max_new_tokens``);
- what the estimator predicts for the same examples (:class:`~peftlab.lab.estimate.CountingPredictor`: prompt passes
  and decode steps by rows, generation replayed with continuous batching; priced by
  :func:`~peftlab.lab.estimate.evaluation_seconds`), with rates calibrated on this machine now for the run's family
  (cached in ``--cache``, default ``runs/bench/generation-schedule-<grid>.json``; the grid's own files are left
  as they are);
- what the estimator predicted before it replayed generation (every batch decoded to ``max_new_tokens``, every
  pass at the full batch's rate), with the same rates;
- the measured passes priced at those rates, which splits what is left of the gap in two: work the estimator did not
  count (or counted and did not happen) against rates the running loop did not reach.

Run it pinned like the grid (``taskset -c 1`` with ``--threads 1`` for the founding studies).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from peftlab.evaluation.schedule import PassTimer
from peftlab.lab.compare import pilot_results, plan
from peftlab.lab.compare_grid import load_grid
from peftlab.lab.estimate import (
    ZERO_SHOT,
    CountingPredictor,
    Work,
    estimate_grid,
    evaluation_seconds,
    trained_output_tokens,
)
from peftlab.lab.experiment import load_split

BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # rows of a pass: 1, 2-3, 4-7, 8-15, 16-31, 32-63, 64+


def bucket(rows: int) -> str:
    low = max(b for b in BUCKETS if b <= rows)
    high = next((b - 1 for b in BUCKETS if b > low), None)
    return f"{low}" if high == low else f"{low}-{high}" if high else f"{low}+"


def _setup(run: Any) -> Any:
    from peftlab.lab.experiment import _zero_shot_setup, build

    if run.kind == ZERO_SHOT:
        return _zero_shot_setup(run.cfg)
    adapter = Path(run.cfg.out) / "adapter"
    if not adapter.exists():
        sys.exit(f"{run.stem}: no trained adapter at {adapter} (run the grid first, or pick another --run)")
    return build(run.cfg, adapter=adapter)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("grid")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--run", default="zero-shot--default--n0--seed0", help="the run's stem (its result file name)")
    ap.add_argument("--examples", type=int, default=None, help="the first N test examples (default: the run's own)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (the founding studies ran with 1)")
    ap.add_argument("--cache", type=Path, default=None, help="rates cache (default: the grid's estimate/cache.json)")
    ap.add_argument("--out", type=Path, default=None, help="write every pass and the summary here (JSON)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = load_grid(args.grid, args.overrides)
    runs = plan(spec, log=lambda _: None)
    pilot_results(runs)
    by_stem = {r.stem: r for r in runs}
    if args.run not in by_stem:
        sys.exit(f"--run {args.run}: not a run of {args.grid}; its runs: {', '.join(by_stem)}")
    run = by_stem[args.run]
    cache = args.cache or Path(f"runs/bench/generation-schedule-{spec.name}.json")
    cache.parent.mkdir(parents=True, exist_ok=True)
    # the grid's families as compare calibrates them (every run counted, for the mean prompt length), this one priced
    statuses = ["new" if r.stem == run.stem else "done" for r in runs]
    predicted = next(e for e in estimate_grid(runs, cache, statuses, log=print).runs if e.stem == run.stem)
    rates = predicted.evaluation_rates

    setup = _setup(run)
    cfg = run.cfg
    examples = load_split(setup, "test", args.examples or cfg.data.max_test)
    ev = cfg.eval
    counted = CountingPredictor(setup.encoder, ev.batch_size, ev.num_beams, ev.continuous_batching, ev.refill_rows,
                                trained_output_tokens(setup.encoder) if run.kind != ZERO_SHOT else None)
    counted.generate(examples, ev.max_new_tokens)
    before = CountingPredictor(setup.encoder, ev.batch_size, ev.num_beams, continuous=False)  # to the cap
    before.generate(examples, ev.max_new_tokens)
    flat = dataclasses.replace(rates, prefill_one_positions_per_s=0.0, decode_one_rows_per_s=0.0)
    prompts = setup.encoder.encode_prompts(list(examples))
    predictor = setup.predictor()
    merged = setup.method.mergeable and cfg.model.dtype == "float32"
    if merged:
        setup.method.merge()
    with PassTimer() as rec:
        t0 = time.perf_counter()
        rows = predictor.generate_ids(prompts, ev.max_new_tokens)
        total = time.perf_counter() - t0
    summary = summarise(rec, rows, total, ev.max_new_tokens)
    measured = Work()
    for n, positions, _ in rec.prefills:
        measured.prompt_pass(n, positions)
    for n, _ in rec.decodes:
        measured.decode(n)
    v = rates.virtual_positions
    summary["predictions"] = {
        "estimator": _priced(counted.work, rates),
        "estimator before (to the cap, flat rates)": _priced(before.work, flat),
        "measured passes at the estimator's rates": _priced(measured, rates),
    }
    summary["rates"] = {k: getattr(rates, k) for k in ("prefill_positions_per_s", "prefill_one_positions_per_s",
                                                       "decode_rows_per_s", "decode_one_rows_per_s", "eval_rows",
                                                       "loop_step_seconds")}
    summary["virtual_positions"] = v
    summary.update(run=run.stem, examples=len(examples), threads=torch.get_num_threads(),
                   batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                   continuous_batching=cfg.eval.continuous_batching, refill_rows=cfg.eval.refill_rows,
                   bf16=predictor.autocast, merged=merged)
    report(summary)
    if args.out:
        args.out.write_text(json.dumps({**summary, "prefills": rec.prefills, "decodes": rec.decodes}, indent=1))
    return summary


def _priced(work: Work, rates: Any) -> dict[str, float]:
    """Prompt positions, decode row-steps and their predicted seconds (prompt passes, decode steps, both)."""
    prefill = Work(prompt_passes=work.prompt_passes)
    decode = Work(decode_steps=work.decode_steps)
    return {"prompt_positions": work.eval_positions, "decode_row_steps": work.decode_rows,
            "prefill_seconds": evaluation_seconds(prefill, rates), "decode_seconds": evaluation_seconds(decode, rates),
            "seconds": evaluation_seconds(work, rates)}


def summarise(rec: PassTimer, rows: list[list[int]], total: float, cap: int) -> dict[str, Any]:
    prefill: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0])
    for n, positions, seconds in rec.prefills:
        b = prefill[bucket(n)]
        b[0], b[1], b[2] = b[0] + 1, b[1] + positions, b[2] + seconds
    decode: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0])
    for n, seconds in rec.decodes:
        b = decode[bucket(n)]
        b[0], b[1], b[2] = b[0] + 1, b[1] + n, b[2] + seconds
    lengths = [len(r) for r in rows]
    p_seconds, d_seconds = sum(s for *_, s in rec.prefills), sum(s for _, s in rec.decodes)
    return {
        "seconds": total,
        "prefill": {"passes": len(rec.prefills), "positions": sum(p for _, p, _ in rec.prefills),
                    "seconds": p_seconds, "by_rows": {k: dict(zip(("passes", "positions", "seconds"), v,
                                                                   strict=True)) for k, v in prefill.items()}},
        "decode": {"steps": len(rec.decodes), "row_steps": sum(n for n, _ in rec.decodes), "seconds": d_seconds,
                   "by_rows": {k: dict(zip(("steps", "row_steps", "seconds"), v, strict=True))
                               for k, v in decode.items()}},
        "other_seconds": total - p_seconds - d_seconds,
        "generated": {"mean_tokens": sum(lengths) / max(1, len(lengths)),
                      "at_cap": sum(1 for n in lengths if n >= cap) / max(1, len(lengths))},
    }


def _by_rows(title: str, names: tuple[str, str, str], part: dict[str, Any]) -> None:
    """One table of passes (or steps) by their rows: count, work, seconds, work per second; then the total."""
    count, work, rate = names
    print(f"\n{title:14s} {count:>7s} {work.replace('_', '-'):>10s} {'seconds':>8s} {rate:>8s}")
    rows = sorted(part["by_rows"].items(), key=lambda kv: int(kv[0].split("-")[0].rstrip("+")))
    for label, b in [*((k + " rows", b) for k, b in rows), ("all", part)]:
        per_s = f"{b[work] / b['seconds']:8.1f}" if b["seconds"] else "       -"
        print(f"{label:14s} {b[count]:7d} {b[work]:10d} {b['seconds']:8.1f} {per_s}")


def report(s: dict[str, Any]) -> None:
    print(f"\n{s['run']}: {s['examples']} examples, batch {s['batch_size']}, max_new_tokens {s['max_new_tokens']}, "
          f"{s['threads']} thread(s), bf16 {s['bf16']}, merged {s['merged']}, continuous batching "
          f"{s['continuous_batching']} (refill at {s['refill_rows']} free rows)")
    print(f"generation took {s['seconds']:.1f} s; generated {s['generated']['mean_tokens']:.1f} tokens per example "
          f"on average, {s['generated']['at_cap']:.0%} reached the cap")
    p, d = s["prefill"], s["decode"]
    _by_rows("prompt passes", ("passes", "positions", "pos/s"), p)
    _by_rows("decode steps", ("steps", "row_steps", "rows/s"), d)
    print(f"rest of the loop (refill copies, bookkeeping): {s['other_seconds']:.1f} s")
    print(f"\n{'':44s} {'prompt pos':>10s} {'prefill s':>9s} {'decode rows':>11s} {'decode s':>8s} {'total s':>8s}")
    for name, e in s["predictions"].items():
        print(f"{name:44s} {e['prompt_positions']:10d} {e['prefill_seconds']:9.1f} {e['decode_row_steps']:11d} "
              f"{e['decode_seconds']:8.1f} {e['seconds']:8.1f}")
    print(f"{'measured':44s} {p['positions']:10d} {p['seconds']:9.1f} {d['row_steps']:11d} {d['seconds']:8.1f} "
          f"{s['seconds']:8.1f}")
    r = s["rates"]
    print(f"(rates at {r['eval_rows']} rows / 1 row: prompt pass {r['prefill_positions_per_s']:.0f} / "
          f"{r['prefill_one_positions_per_s']:.0f} positions/s, decode {r['decode_rows_per_s']:.1f} / "
          f"{r['decode_one_rows_per_s']:.1f} row-steps/s, the loop's own work {1000 * r['loop_step_seconds']:.1f} ms "
          f"per decode step; {s['virtual_positions']} virtual positions per row are priced on top of the prompt "
          "positions)")


if __name__ == "__main__":
    main()
