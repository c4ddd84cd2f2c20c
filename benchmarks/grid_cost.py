"""Issue 11's yardstick: the CPU-hours of the founding studies' IMDB and CNN/DM grids before and after its levers.

The grids themselves ran once, after (their result files in ``studies/``, each with its wall time, train seconds and
evaluation seconds). Before the levers the code could not run them as defined (no lr pilots, no forgetting pass), so
"before" is measured per kind of work and scaled, not rerun: the same short workloads run under ``peftlab train`` at
the commit before the levers (``--before``, default 2575b01, the parent of the first lever 1c99a32) and at this one,
in alternating order, each in a fresh process pinned to the same core(s), and give three ratios (before seconds /
after seconds, medians over ``--repeats`` rounds):

    train     training seconds (IMDB: LoRA r 8 q,v on 128-token reviews, batch 8; CNN/DM: LoRA r 16 q,v on
              384-token articles, batch 4 x accumulation 4), bf16 as the grids run
    score     classification evaluation seconds (IMDB test reviews, every label scored)
    generate  summarization evaluation seconds (CNN/DM test articles, greedy, 96 new tokens)

Each study run's "before" is then its wall time with its training seconds scaled by the train ratio of its grid and
its evaluation seconds by the score (IMDB) or generate (CNN/DM) ratio; the rest (loading, validation, forgetting,
saves) is taken as unchanged. Printed: the per-kind ratios, and per grid "X CPU-h -> Y" (one thread per run, so
wall hours are core-hours; the finished runs only while a grid is incomplete).

Usage (a quiet machine; the other core idle, or what else runs said beside the numbers):
    python benchmarks/grid_cost.py [--before REV] [--repeats 3] [--threads 1] [--cpus 1] [--out JSON]
    python benchmarks/grid_cost.py --quick --repeats 1     # the plumbing only: a few examples, no figure to read
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from estimate_accuracy import actual_times  # this folder's sibling: one reader of a result file's times

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

# name -> (grid, kind, peftlab train arguments); the same arguments run at both commits
WORKLOADS = {
    "imdb-lora": ("imdb", ("train", "score"), [
        "model=smollm2-135m", "task=classification", "task.max_source_tokens=128", "task.max_target_tokens=8",
        f"data={DATA / 'imdb'}", "data.max_train=200", "data.max_validation=8", "data.max_test=200",
        "method=lora", "method.r=8", "method.target_modules=[q,v]", "train.lr=1e-3", "train.batch_size=8",
        "train.epochs=1", "train.eval_every=0", "train.eval_examples=0", "train.bf16=true", "eval.batch_size=16"]),
    "cnndm-lora": ("cnndm", ("train", "generate"), [
        "model=smollm2-135m", "task=summarization", "task.max_source_tokens=384", "task.max_target_tokens=96",
        f"data={DATA / 'cnn_dailymail'}", "data.max_train=48", "data.max_validation=8", "data.max_test=32",
        "method=lora", "method.r=16", "method.alpha=32", "method.target_modules=[q,v]", "train.lr=1e-3",
        "train.batch_size=4", "train.grad_accum=4", "train.epochs=1", "train.eval_every=0", "train.eval_examples=0",
        "train.bf16=true", "eval.batch_size=16", "eval.max_new_tokens=96"]),
}


def worktree(rev: str, where: Path) -> Path:
    """A detached checkout of ``rev`` (created once, reused)."""
    if not (where / "src" / "peftlab").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(where), rev],
                       check=True, capture_output=True)
    return where


def run_once(src: Path, args: list[str], out: Path, threads: int, cpus: str) -> dict[str, float]:
    """One ``peftlab train`` of the workload with ``src`` first on the path; its train and evaluation seconds."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = ["taskset", "-c", cpus, sys.executable, "-m", "peftlab.cli", "train", *args, f"out={out}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=src.parent)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    info = json.loads((out / "result.json").read_text())["train_info"]
    return {"train": info["train_seconds"],
            "eval": sum(s["eval_seconds"] for s in (info.get("eval") or {}).values())}


QUICK = ["data.max_train=4", "data.max_test=4", "eval.max_new_tokens=8"]  # --quick: appended, the last word wins


def measure(before: Path, after: Path, repeats: int, threads: int, cpus: str, tmp: Path,
            extra: list[str], partial: Path | None = None) -> dict[str, dict]:
    """Per workload and side, every round's seconds; the sides alternate, starting with the other one each round.
    ``partial``: the rounds so far are rewritten there after each run, so a benchmark cut short keeps them."""
    rounds: dict[str, dict[str, list[dict[str, float]]]] = {w: {"before": [], "after": []} for w in WORKLOADS}
    for r in range(repeats):
        for name, (_, _, workload) in WORKLOADS.items():
            args = [*workload, *extra]
            sides = [("after", after), ("before", before)]
            for side, src in (sides if r % 2 == 0 else sides[::-1]):
                seconds = run_once(src / "src", args, tmp / f"{name}-{side}-{r}", threads, cpus)
                rounds[name][side].append(seconds)
                print(f"round {r + 1}: {name} {side}: train {seconds['train']:.1f} s, eval {seconds['eval']:.1f} s",
                      flush=True)
                if partial is not None:
                    partial.write_text(json.dumps({"rounds": rounds, "complete": False}, indent=1))
    return rounds


def ratios(rounds: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per grid, before/after of the medians for its train and evaluation kinds."""
    out: dict[str, dict[str, float]] = {}
    for name, (grid, (train_kind, eval_kind), _) in WORKLOADS.items():
        med = {side: {k: statistics.median(x[k] for x in rounds[name][side]) for k in ("train", "eval")}
               for side in ("before", "after")}
        out[grid] = {train_kind: med["before"]["train"] / med["after"]["train"],
                     eval_kind: med["before"]["eval"] / med["after"]["eval"], "medians": med}
    return out


def grid_hours(folder: Path, train_ratio: float, eval_ratio: float) -> tuple[int, float, float]:
    """(runs, after hours, before hours) over a study folder's result files, pilots included."""
    n, after, before = 0, 0.0, 0.0
    for path in sorted([*folder.glob("*.json"), *folder.glob("pilots/*.json")]):
        times = actual_times(path)
        if times is None or path.stem.startswith("lead-3"):
            continue  # lead-3 is derived from zero-shot's outputs: no model ran for it
        n, after = n + 1, after + times["wall"]
        before += times["wall"] + times["train"] * (train_ratio - 1) + times["evaluation"] * (eval_ratio - 1)
    return n, after / 3600, before / 3600


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="2575b01", help="the commit before the levers (default 2575b01)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (the grids ran with 1)")
    ap.add_argument("--cpus", default="1", help="taskset CPU list for every run (default core 1)")
    ap.add_argument("--studies", default=str(ROOT / "studies"))
    ap.add_argument("--out", help="write rounds, ratios and grid hours as JSON here")
    ap.add_argument("--quick", action="store_true", help="4 examples per workload: checks the plumbing only")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="peftlab-grid-cost-") as tmp:
        before = worktree(args.before, Path(tmp) / "before")
        rounds = measure(before, ROOT, args.repeats, args.threads, args.cpus, Path(tmp), QUICK if args.quick else [],
                         partial=Path(args.out) if args.out else None)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    found = ratios(rounds)
    report = {"before": args.before, "rounds": rounds, "ratios": found, "grids": {}}
    for grid, r in found.items():
        print(f"{grid}: before / after: train {r['train']:.2f}x, "
              + ", ".join(f"{k} {v:.2f}x" for k, v in r.items() if k not in ("train", "medians")))
        eval_ratio = r.get("score", r.get("generate", 1.0))
        n, after, before_h = grid_hours(Path(args.studies) / grid, r["train"], eval_ratio)
        report["grids"][grid] = {"runs": n, "before_hours": before_h, "after_hours": after}
        print(f"{grid} grid ({n} finished runs): {before_h:.1f} CPU-h -> {after:.1f} CPU-h")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
