"""Training-speed benchmark: peftlab (a) against PEFT + ``transformers.Trainer`` with dynamic padding (b), the same
Trainer set up by an expert to apply the head on labelled positions only (b'), and the course reports' recipe,
padding to ``max_length`` (c), on the same model, data, batch size, sequence lengths, precision and machine, in one
invocation, each run in its own fresh process.

For every workload and method the harness runs the workers ``--repeats`` times (default 3) in rotated order: repeat
r starts at variant r mod k (a b b' c, then b b' c a, ...), so no variant always runs first on a cold machine or
last on a hot one. It measures the matmul ceiling before and after all runs and prints, per variant, the median
tok/s (real, non-pad tokens) with its min-max range, the median seconds per step, the median peak memory, every
ratio against (b) and (b') both per repeat and as their median, and where the FLOPs go (useful and executed
GFLOP/s against the ceiling). ``--out`` gets every worker record (per-step times included) plus the summary as JSON.

The data are prepared once here: the same N examples (seeded sample) of each workload, tokenized with peftlab's
``PromptEncoder`` (template, truncation, target-only labels), in peftlab's batch order, written to a JSON file
every worker reads. ``--random-init CONFIG`` first saves a randomly initialised model (preset ``tiny`` or
``llama-1b``, or a JSON config) with the tokenizer of ``--model`` (or ``--tokenizer``) and benchmarks that.

Example (CPU, SmolLM2-135M, all methods, both workloads):
    python benchmarks/speed/harness.py --out runs/bench/speed-cpu.json
GPU, a ~1B random Llama in bf16:
    python benchmarks/speed/harness.py --random-init llama-1b --device cuda --dtype bf16 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from speed_common import (
    DEFAULT_DATA_ROOT,
    DEFAULT_VARIANTS,
    DTYPES,
    METHODS,
    RESULT_MARKER,
    VARIANTS,
    WORKLOADS,
    choice,
    run_order,
    write_random_model,
)
from speed_report import add_flops, markdown, planned_work, summarize

HERE = Path(__file__).resolve().parent
WORKER_SCRIPTS = {"peftlab": ["peftlab_worker.py"], "peftlab-compile": ["peftlab_worker.py", "--compile"],
                  "trainer": ["hf_trainer_worker.py", "--recipe", "trainer"],
                  "trainer-expert": ["hf_trainer_worker.py", "--recipe", "trainer-expert"],
                  "course": ["hf_trainer_worker.py", "--recipe", "course"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model.name (alias, HF folder, .gguf); with "
                                                           "--random-init: where the tokenizer comes from")
    p.add_argument("--random-init", "--model-config", dest="random_init", default=None,
                   help="benchmark a random-weight model built from a config: tiny | llama-1b | path/to/config.json")
    p.add_argument("--tokenizer", default=None, help="tokenizer source for --random-init (default: --model)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma list of {', '.join(VARIANTS)} (default: all but peftlab-compile)")
    p.add_argument("--examples", type=int, default=64, help="examples sampled per workload (seeded); at least "
                                                            "batch size x (warmup + steps)")
    p.add_argument("--split", default="train", help="split the examples are drawn from")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (>= 1)")
    p.add_argument("--steps", type=int, default=6, help="measured steps")
    p.add_argument("--repeats", type=int, default=3, help="runs per (workload, method, variant), in rotated order; "
                                                          "medians, ranges and per-repeat ratios reported")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16")
    p.add_argument("--device", default="cpu", help="cpu | cuda (the default GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: torch's own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the example sample, the batch order and the runs")
    p.add_argument("--batch-order", default="bucketed", help="bucketed (peftlab's default) | random")
    p.add_argument("--matmul-size", type=int, default=None, help="ceiling matmul size (default 2048 CPU, 8192 GPU)")
    p.add_argument("--matmul-seconds", type=float, default=1.0, help="length of each of the 3 timed ceiling rounds")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="folder holding cnn_dailymail/, imdb/")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--out", type=Path, default=None, help="write all records and the summary here (JSON)")
    p.add_argument("--timeout", type=int, default=7200, help="seconds before a worker is killed")
    args = p.parse_args(argv)
    args.methods = [choice(m, METHODS, "--methods") for m in args.methods.split(",") if m]
    args.workloads = [choice(w, WORKLOADS, "--workloads") for w in args.workloads.split(",") if w]
    args.variants = [choice(v, VARIANTS, "--variants") for v in args.variants.split(",") if v]
    choice(args.dtype, DTYPES, "--dtype")
    choice(args.device, ("cpu", "cuda"), "--device")
    choice(args.batch_order, ("bucketed", "random"), "--batch-order")
    if min(args.batch_size, args.warmup, args.steps, args.repeats) < 1:
        raise SystemExit("--batch-size, --warmup, --steps and --repeats must be >= 1")
    need = args.batch_size * (args.warmup + args.steps)
    if args.examples < need:
        raise SystemExit(f"--examples {args.examples}: the runs need batch size x (warmup + steps) = {need}")
    args.examples -= args.examples % args.batch_size  # whole batches only: a short batch would shift the plan
    return args


def prepare_data(args: argparse.Namespace, workload_name: str, model_source: str, path: Path) -> dict[str, Any]:
    """Sample, tokenize and order one workload's examples; write them to ``path`` and return the file's content."""
    from transformers import AutoTokenizer

    from peftlab.config import DataConfig, TaskConfig
    from peftlab.data.batching import length_bucketed_batches
    from peftlab.data.dataset import load_examples
    from peftlab.data.encode import PromptEncoder
    from peftlab.models.loading import pretrained_source
    from peftlab.tasks import get_task

    workload = WORKLOADS[workload_name]
    folder = args.data_root / workload.folder
    if not folder.is_dir():
        raise SystemExit(f"--data-root {args.data_root}: no {workload.folder}/ folder for workload {workload_name}")
    task_cfg = TaskConfig(name=workload.task, max_source_tokens=workload.max_source_tokens,
                          max_target_tokens=workload.max_target_tokens,
                          labels=list(workload.labels) if workload.labels else None)
    task = get_task(task_cfg)
    examples, _ = load_examples(DataConfig(path=str(folder)), task, args.split, limit=args.examples,
                                sample_seed=args.seed)
    if len(examples) < args.examples:
        raise SystemExit(f"{folder} split {args.split!r} has only {len(examples)} usable examples; "
                         f"--examples asks for {args.examples}")
    tokenizer = AutoTokenizer.from_pretrained(pretrained_source(model_source))
    encoded = PromptEncoder(tokenizer, task, task_cfg).encode_many(examples)
    bucketing = args.batch_order == "bucketed"
    batches = length_bucketed_batches([len(e) for e in encoded], args.batch_size, args.seed, 0, bucketing)
    data = {"workload": workload_name, "source": str(folder), "split": args.split, "batch_size": args.batch_size,
            "order_seed": args.seed, "bucketing": bucketing, "max_length": workload.max_length,
            "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            "ids": [e.id for e in examples], "batches": batches,
            "examples": [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]}
    path.write_text(json.dumps(data))
    return data


def run_process(cmd: list[str], timeout: int) -> tuple[dict[str, Any] | None, str]:
    """Run one worker; (its SPEED_RESULT record or None, an error text when it failed)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s: {' '.join(cmd)}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        return None, f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len(RESULT_MARKER):]), ""


def measure_ceiling(args: argparse.Namespace) -> dict[str, Any] | None:
    """The matmul ceiling, measured in this process with the workers' thread count (nothing else runs meanwhile)."""
    import torch
    from matmul_ceiling import DEFAULT_SIZE, measure

    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.matmul_size or DEFAULT_SIZE[torch.device(args.device).type]
    try:
        return measure(size, args.dtype, args.device, args.matmul_seconds)
    except RuntimeError as exc:  # e.g. out of GPU memory for the chosen size: the speed runs still count
        print(f"[harness] matmul ceiling failed: {exc}", file=sys.stderr)
        return None


def worker_command(args: argparse.Namespace, variant: str, model: str, data_file: Path, method: str,
                   workdir: Path) -> list[str]:
    script, *extra = WORKER_SCRIPTS[variant]
    cmd = [sys.executable, str(HERE / script), *extra, "--model", model, "--data", str(data_file),
           "--method", method, "--warmup", str(args.warmup), "--steps", str(args.steps), "--dtype", args.dtype,
           "--device", args.device, "--seed", str(args.seed), "--workdir", str(workdir)]
    return cmd + (["--threads", str(args.threads)] if args.threads else [])


def run_all(args: argparse.Namespace, model: str, data: dict[str, tuple[Path, dict]], workdir: Path) -> list[dict]:
    """Every (workload, method, repeat, variant) in its own process; failures are recorded, not fatal."""
    plan = [(w, m, r, v) for w in args.workloads for m in args.methods
            for r, v in run_order(args.variants, args.repeats)]
    records = []
    for n, (workload, method, repeat, variant) in enumerate(plan, start=1):
        data_file, content = data[workload]
        scratch = workdir / f"run-{n:03d}"
        cmd = worker_command(args, variant, model, data_file, method, scratch)
        start = time.time()
        record, error = run_process(cmd, args.timeout)
        shutil.rmtree(scratch, ignore_errors=True)
        if record is None:
            record = {"workload": workload, "method": method, "variant": variant, "error": error}
            status = "FAILED (" + error.strip().splitlines()[-1][-160:] + ")"
        else:
            status = f"{record['tokens_per_s']:.1f} tok/s"
            if record.get("compiled_graphs_total"):
                status += (f", {record['compiled_graphs_total']} graphs compiled ({record['compiled_graphs']} in the "
                           f"window), warm-up {record['warmup_seconds']:.0f} s")
        record.update(repeat=repeat, command=cmd, wall_seconds=time.time() - start)
        records.append(record)
        print(f"[harness] {n}/{len(plan)} {workload} {method} repeat {repeat + 1} {variant}: {status} "
              f"({record['wall_seconds']:.0f} s)", file=sys.stderr, flush=True)
    return records


def run_info(args: argparse.Namespace, model: str, started: float) -> dict[str, Any]:
    import torch

    from peftlab.lab import results

    return {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "model": model,
        "started": started, "finished": time.time(), "date": time.strftime("%Y-%m-%d"),
        "git_commit": results.git_commit(), "versions": results.package_versions(),
        "machine": results.machine_info(torch.device(args.device))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the tables; return (and with ``--out`` write) the full result."""
    args = parse_args(argv)
    started = time.time()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="peftlab-speed-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        model = args.model
        if args.random_init:
            model = str(write_random_model(args.random_init, _tokenizer_source(args), workdir / "model",
                                           args.dtype, args.seed))
        data = {}
        for name in args.workloads:
            path = workdir / f"data-{name}.json"
            data[name] = (path, prepare_data(args, name, model, path))
        before = measure_ceiling(args)
        records = run_all(args, model, data, workdir)
        after = measure_ceiling(args)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    measurements = [m for m in (before, after) if m]
    ceiling = ({"gflops": max(m["gflops"] for m in measurements), "measurements": measurements}
               if measurements else None)
    for record in records:
        if "error" not in record:
            add_flops(record, planned_work(data[record["workload"]][1], args.warmup, args.steps),
                      ceiling["gflops"] if ceiling else None)
    summary = summarize(records)
    table = markdown(summary, ceiling)
    print(table)
    result = {"run_info": run_info(args, model, started), "ceiling": ceiling, "summary": summary,
              "runs": records, "table": table}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"[harness] wrote {args.out}", file=sys.stderr)
    return result


def _tokenizer_source(args: argparse.Namespace) -> str:
    """A folder holding just a tokenizer is used as it is; anything else is resolved like ``model.name``."""
    from peftlab.models.loading import pretrained_source

    source = args.tokenizer or args.model
    return source if Path(source).is_dir() else pretrained_source(source)


if __name__ == "__main__":
    main()
