"""How close `peftlab compare --estimate` comes to a finished grid: every run's predicted seconds (train, evaluation,
total) beside the times its result file recorded.

Usage:
    python benchmarks/estimate_accuracy.py configs/compare/imdb.yaml results=studies [--cache PATH] [--out JSON]

The grid is planned as `compare` plans it (the pilots past an edge included, from their results), every run is
predicted as if none had run, with rates calibrated now on this machine (cached in ``--cache``, by default
``runs/bench/estimate-<grid name>.json``, so the study's own estimate cache and predictions are left as they are),
and each run that has a result is set against it: its wall time (finished - started), train seconds, evaluation
seconds and CPU share (CPU seconds over wall seconds x torch threads; '-' where not recorded). A run that shared its
core with other work ran slower than the machine's own rates, so the totals are given over all runs and over those
recorded at >= 90% CPU share. Calibrate in the conditions the grid ran in (its threads, what else ran beside it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from peftlab.lab.compare import _read_result, pilot_results, plan
from peftlab.lab.compare_grid import load_grid
from peftlab.lab.estimate import estimate_grid, format_duration

CLEAN_SHARE = 0.9


def actual_times(path: Path) -> dict[str, Any] | None:
    """The recorded times of one run's result file (wall, train and evaluation seconds, CPU share), or None when it
    has not finished."""
    if not path.exists():
        return None
    record = _read_result(path)
    info, train = record.run_info, record.train_info
    wall = info.wall_seconds()
    if wall is None:
        return None
    evaluation = sum(s.eval_seconds or 0.0 for s in (train.eval or {}).values())
    return {"wall": wall, "train": train.train_seconds or 0.0, "evaluation": evaluation,
            "cpu_share": info.cpu_share(), "early_stop": train.early_stop_step is not None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("grid")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--cache", help="rates and counts cache (default runs/bench/estimate-<name>.json)")
    ap.add_argument("--out", help="write the rows and totals as JSON here")
    args = ap.parse_args()
    spec = load_grid(args.grid, args.overrides)
    runs = plan(spec, log=lambda _: None)
    pilot_results(runs)  # inserts the pilots that earlier invocations ran past an edge
    cache = Path(args.cache or f"runs/bench/estimate-{spec.name}.json")
    cache.parent.mkdir(parents=True, exist_ok=True)
    estimate = estimate_grid(runs, cache)
    rows = []
    for run, predicted in zip(runs, estimate.runs, strict=True):
        actual = actual_times(run.result_path)
        if actual is None or run.kind == "lead-3":
            continue
        rows.append({"run": run.stem, "kind": run.kind, "predicted": predicted.seconds, "actual": actual})
    print(f"{'run':48s} {'pred train':>10s} {'act train':>9s} {'pred eval':>9s} {'act eval':>8s} "
          f"{'pred':>7s} {'actual':>7s} {'ratio':>6s} {'CPU':>5s}")
    for r in rows:
        p, a = r["predicted"], r["actual"]
        share = f"{a['cpu_share']:.0%}" if a["cpu_share"] is not None else "-"
        print(f"{r['run'][:48]:48s} {p['train']:10.0f} {a['train']:9.0f} {p['evaluation']:9.0f} "
              f"{a['evaluation']:8.0f} "
              f"{format_duration(p['total']):>7s} {format_duration(a['wall']):>7s} "
              f"{a['wall'] / max(p['total'], 1e-9):6.2f} {share:>5s}{' early stop' if a['early_stop'] else ''}")
    totals = {}
    clean = [r for r in rows if (r["actual"]["cpu_share"] or 0) >= CLEAN_SHARE]
    for name, subset in (("all", rows), ("clean", clean)):
        pred = sum(r["predicted"]["total"] for r in subset)
        act = sum(r["actual"]["wall"] for r in subset)
        totals[name] = {"runs": len(subset), "predicted": pred, "actual": act, "ratio": act / pred if pred else None}
        if subset:
            print(f"total ({name}, {len(subset)} runs): predicted {format_duration(pred)}, "
                  f"actual {format_duration(act)}, actual / predicted {act / pred:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"grid": args.grid, "rows": rows, "totals": totals}, indent=1))


if __name__ == "__main__":
    main()
