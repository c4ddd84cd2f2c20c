"""Speed worker (a): peftlab's own pieces, as a user gets them: ``lab.experiment.build`` (load the model, apply the
method) and ``training.trainer.Trainer`` (length-bucketed batches, target-only loss, AdamW, clipping).

Runs ``warmup + steps`` optimizer steps on the prepared data file and prints one ``SPEED_RESULT {json}`` line.
The measured window is the wall time between the ends of steps ``warmup`` and ``warmup + steps`` (callback
``on_step``), so it holds everything the loop does per step (collation, forward, backward, optimizer, logging);
the run is stopped right after the window, before the end-of-training checkpoint. ``train.max_steps`` is one more
than that, so the learning-rate schedule is the same as the Trainer side's.

``--compile`` is variant (a'): the same run with ``train.compile=true``. Compiling happens in the first warm-up step
(and again for a shape dynamo specialises, e.g. a batch without padding), so the record adds ``warmup_seconds`` (the
steps before the window, compiling included), ``compiled_graphs_total`` (graphs dynamo compiled in the run) and
``compiled_graphs`` (those compiled inside the measured window: more than 0 means a recompile was timed).

Usage (normally spawned by harness.py): python benchmarks/speed/peftlab_worker.py --model M --data FILE
    --method lora-qv --warmup 2 --steps 6 --workdir DIR [--dtype bf16 --device cuda] [--compile]
"""

from __future__ import annotations

import argparse
import time

import torch
from speed_common import (
    METHODS,
    PEFTLAB_DTYPES,
    WORKLOADS,
    MemoryProbe,
    StepWindow,
    WorkCounter,
    check_worker_args,
    emit,
    load_prepared,
    method_lr,
    model_facts,
    run_facts,
    worker_parser,
)

from peftlab.config import MethodConfig, RunConfig
from peftlab.data.encode import EncodedExample
from peftlab.lab.experiment import build
from peftlab.training.trainer import Interrupt, Trainer, TrainState


def run_config(args: argparse.Namespace, data: dict) -> RunConfig:
    """The peftlab configuration of this run (validated): the same settings a user would write in YAML."""
    workload, method = WORKLOADS[data["workload"]], METHODS[args.method]
    cfg = RunConfig()
    cfg.model.name, cfg.model.dtype = args.model, PEFTLAB_DTYPES[args.dtype]
    cfg.task.name = workload.task
    cfg.task.max_source_tokens, cfg.task.max_target_tokens = workload.max_source_tokens, workload.max_target_tokens
    cfg.task.labels = list(workload.labels) if workload.labels else None
    cfg.method = MethodConfig(method.peftlab_name, dict(method.options))
    train = cfg.train
    train.lr, train.batch_size, train.grad_accum = method_lr(args.method), data["batch_size"], 1
    train.max_steps = args.warmup + args.steps + 1
    train.seed, train.length_bucketing = data["order_seed"], data["bucketing"]
    train.device, train.compile = args.device, args.compile
    cfg.out = str(args.workdir)
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None) -> dict:
    """Train, measure the window, print and return the record."""
    parser = worker_parser(__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="train.compile=true (variant peftlab-compile)")
    args = parser.parse_args(argv)
    check_worker_args(args)
    data = load_prepared(args.data)
    cfg = run_config(args, data)
    setup = build(cfg)
    examples = [EncodedExample(e["input_ids"], e["labels"]) for e in data["examples"]]
    params = list(setup.method.trainable_parameters().values())
    facts = model_facts(setup.method.model, params)
    memory = MemoryProbe(setup.device)
    memory.mark_loaded()
    counter = WorkCounter(setup.method.model)
    window = StepWindow(args.warmup, args.steps, setup.device)

    def totals(state: TrainState) -> dict[str, int]:
        return {"real_tokens": state.input_tokens, "target_tokens": state.target_tokens, **counter.totals(),
                "compiled_graphs": compiled_graphs()}

    def on_step(state: TrainState) -> None:
        window.on_step_end(state.step, lambda: totals(state))
        if window.done(state.step):
            raise Interrupt  # stop right after the window: the end-of-run checkpoint is not part of a step

    trainer = Trainer(setup.method, examples, [], cfg.train, args.workdir, setup.tokenizer.pad_token_id,
                      cfg.train.lr, None, setup.device, on_step, setup.autocast)
    started = time.perf_counter()
    try:
        trainer.fit()
    except Interrupt:
        pass
    variant = "peftlab-compile" if args.compile else "peftlab"
    record = {**run_facts(args, variant, data), **facts, **window.result(), **memory.report(),
              "warmup_seconds": window.times[args.warmup] - started, "compiled_graphs_total": compiled_graphs(),
              "torch_version": torch.__version__}
    emit(record)
    return record


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (0 without train.compile)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


if __name__ == "__main__":
    main()
