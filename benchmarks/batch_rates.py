"""Training and prompt-pass throughput (positions/s) of one method at several batch sizes, as the grid estimator's
calibration (peftlab.lab.calibrate) measures them: why it calibrates at the grid's own batch sizes.

Training: the method's own Trainer on synthetic sequences (``--length`` positions, the loss on the last
``--targets``), ``--steps`` optimizer steps of ``rows`` sequences each; the first step (one-off costs at the shape)
is not timed. Prompt pass: ``peftlab.evaluation.generate.prefill`` of ``rows`` prompts of ``--prompt`` tokens under
evaluation's precision (bf16 autocast with the frozen weights cast once, ``ModelPredictor.precision()``), or under
plain autocast with ``--plain-autocast`` (every frozen weight re-cast at each forward); the best of 3 after one
warm-up, a mergeable method merged as evaluation runs it. Also printed: the process's peak resident memory.

Usage:
    python benchmarks/batch_rates.py --method lora --train-rows 1,8 --prefill-rows 1,16 [--bf16] [--threads 1]
        [--length 160] [--targets 4] [--prompt 150] [--option method.target_modules=[q,v]] [--plain-autocast]
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
import time

import torch

from peftlab.config import load_config
from peftlab.evaluation.generate import prefill
from peftlab.lab.calibrate import _synthetic
from peftlab.lab.experiment import build
from peftlab.training.trainer import Trainer


def train_rate(setup, rows: int, length: int, targets: int, steps: int) -> tuple[float, list[float]]:
    """Positions/s over steps 2..steps (each ``rows`` x ``length``), and every step's seconds."""
    data = [_synthetic(setup.tokenizer, length, targets, k) for k in range(rows * steps)]
    cfg = dataclasses.replace(setup.cfg.train, max_steps=steps, batch_size=rows, grad_accum=1, eval_every=0,
                              save_every=0, log_every=10**9, length_bucketing=False, patience=0, warmup_steps=0,
                              warmup_ratio=0.0)
    times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(setup.method, data, [], cfg, tmp, setup.tokenizer.pad_token_id, 1e-4, None, setup.device,
                lambda state: times.append(state.train_seconds), setup.autocast).fit()
    per_step = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    return rows * length * (steps - 1) / sum(per_step[1:]), per_step


def prefill_rate(setup, rows: int, length: int, plain_autocast: bool) -> float:
    """Positions/s of one prompt pass of ``rows`` prompts (best of 3 after a warm-up of the same shape)."""
    prompts = [_synthetic(setup.tokenizer, length, 1, 7 + k).input_ids for k in range(rows)]
    pad = setup.tokenizer.pad_token_id
    setup.method.model.eval()
    precision = (torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=setup.autocast) if plain_autocast
                 else setup.predictor().precision())
    with torch.no_grad(), precision:
        prefill(setup.method, prompts, pad, setup.device)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            prefill(setup.method, prompts, pad, setup.device)
            best = min(best, time.perf_counter() - t0)
    return rows * length / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="lora")
    ap.add_argument("--option", action="append", default=[], help="extra config override (repeatable)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bf16", action="store_true", help="train.bf16=true (as the study grids run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-rows", default="1,8", help="comma list ('' for none)")
    ap.add_argument("--prefill-rows", default="1,16", help="comma list ('' for none)")
    ap.add_argument("--length", type=int, default=160, help="training sequence positions")
    ap.add_argument("--targets", type=int, default=4, help="labelled positions per training sequence")
    ap.add_argument("--steps", type=int, default=4, help="training steps per batch size (the first is not timed)")
    ap.add_argument("--prompt", type=int, default=150, help="prompt tokens per row of the prompt pass")
    ap.add_argument("--plain-autocast", action="store_true", help="prompt pass under plain autocast")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, [f"method={args.method}", f"model={args.model}", f"train.bf16={str(args.bf16).lower()}",
                             *args.option])
    setup = build(cfg)
    label = " ".join([args.method, *args.option, "bf16" if args.bf16 else "fp32", f"{args.threads} thread(s)"])
    for rows in [int(r) for r in args.train_rows.split(",") if r]:
        rate, per_step = train_rate(setup, rows, args.length, args.targets, args.steps)
        steps = [round(s, 2) for s in per_step]
        print(f"{label}: train {rows} x {args.length}: {rate:.0f} positions/s (steps {steps})", flush=True)
    if setup.method.mergeable:  # evaluation runs a mergeable method merged into the base weights
        setup.method.merge()
    for rows in [int(r) for r in args.prefill_rows.split(",") if r]:
        rate = prefill_rate(setup, rows, args.prompt, args.plain_autocast)
        kind = "plain autocast" if args.plain_autocast else "evaluation's precision"
        print(f"{label}: prompt pass {rows} x {args.prompt} ({kind}): {rate:.0f} positions/s", flush=True)
    print(f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
