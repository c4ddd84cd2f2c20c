"""Greedy generation before/after the preallocated KV cache and dropping finished rows, in one invocation.

Before (the loop up to commit 1c99a32): Hugging Face's ``DynamicCache``, which appends each step's keys with
``torch.cat`` (copying the layer's whole cache every step), and every row of a batch decoded until the batch's
longest output ends. After: :func:`peftlab.evaluation.generate.greedy_generate` (a preallocated cache written one
column per step; rows dropped from the batch once a quarter of the live rows have finished), and the same with
``drop_fraction=0`` to separate the two levers. All variants decode the same pre-tokenized prompts in the same
batches; the order rotates over ``--repeats`` rounds after an untimed warm-up batch. The outputs must be
token-identical (checked).

Usage:
    python benchmarks/generation_cache.py [--model smollm2-135m] [--data ../shared/data/cnn_dailymail]
        [--task summarization] [--examples 32] [--batch-size 16] [--max-new-tokens 100] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from bench_common import add_workload_options, benchmark_parser, parse_benchmark_args

from peftlab.config import RunConfig
from peftlab.data.dataset import load_examples
from peftlab.evaluation.generate import _cut_at_eos, greedy_generate, prefill
from peftlab.lab.experiment import build
from peftlab.methods.base import PeftMethod


@torch.no_grad()
def greedy_before(method: PeftMethod, prompts: Sequence[Sequence[int]], pad_id: int, eos_ids: set[int],
                  max_new_tokens: int, device: torch.device) -> list[list[int]]:
    """The decoding loop as it was: growing DynamicCache, finished rows fed padding until the batch ends."""
    state = prefill(method, prompts, pad_id, device)
    cache, logits, attention_mask, position = state.cache, state.logits, state.attention_mask, state.position
    batch = len(prompts)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_ids), device=device)
    generated: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        next_token = torch.where(finished, torch.full_like(logits[:, 0], pad_id, dtype=torch.long), logits.argmax(-1))
        generated.append(next_token)
        finished |= torch.isin(next_token, eos)
        if bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        position = position + 1
        out = method.model(input_ids=next_token[:, None], attention_mask=attention_mask, position_ids=position,
                           cache=cache, use_cache=True, logits_to_keep=1)
        cache, logits = out.cache, out.logits[:, -1]
    return [_cut_at_eos(row, eos_ids) for row in torch.stack(generated, dim=1).tolist()]


def timed(decode: Callable[..., list[list[int]]], batches: list[list[list[int]]], **kwargs) -> tuple[float, list]:
    start, rows = time.perf_counter(), []
    for batch in batches:
        rows += decode(prompts=batch, **kwargs)
    return time.perf_counter() - start, rows


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    add_workload_options(parser, data="../shared/data/cnn_dailymail", examples=32, batch_size=16)
    parser.add_argument("--task", default="summarization")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    args = parse_benchmark_args(parser, argv)
    cfg = RunConfig()
    cfg.model.name, cfg.task.name, cfg.data.path = args.model, args.task, args.data
    cfg.validate()
    setup = build(cfg)
    setup.method.model.eval()
    examples, _ = load_examples(cfg.data, setup.task, cfg.data.test_split, limit=args.examples, sample_seed=0)
    prompts = sorted(setup.encoder.encode_prompts(examples), key=len)  # as evaluation batches them
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    predictor = setup.predictor()
    common = {"method": setup.method, "pad_id": predictor.pad_id, "eos_ids": predictor.eos_ids,
              "max_new_tokens": args.max_new_tokens, "device": setup.device}
    variants: dict[str, Callable[..., list[list[int]]]] = {
        "before (DynamicCache, all rows)": greedy_before,
        "preallocated, all rows": lambda **kw: greedy_generate(**kw, drop_fraction=0.0),
        "preallocated, finished rows dropped": greedy_generate,
    }
    timed(greedy_generate, batches[:1], **common)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, list] = {}
    names = list(variants)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds, outputs[name] = timed(variants[name], batches, **common)
            times[name].append(seconds)
    reference = outputs[names[0]]
    tokens = sum(len(row) for row in reference)
    print(f"{args.model}, zero-shot, {len(prompts)} prompts of {args.data} ({sum(map(len, prompts))} tokens), batch "
          f"{args.batch_size}, up to {args.max_new_tokens} new tokens ({tokens} generated), "
          f"{torch.get_num_threads()} threads, {args.repeats} rotated repeats\n")
    print("| decoding | median s | range s | speed-up vs before | outputs |\n|---|---|---|---|---|")
    base = statistics.median(times[names[0]])
    for name in names:
        med = statistics.median(times[name])
        same = sum(a == b for a, b in zip(outputs[name], reference, strict=True))
        print(f"| {name} | {med:.1f} | {min(times[name]):.1f}-{max(times[name]):.1f} | {base / med:.2f}x | "
              f"{same}/{len(reference)} identical |")


if __name__ == "__main__":
    main()
