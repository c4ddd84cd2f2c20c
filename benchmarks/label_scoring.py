"""Classification evaluation before/after one-pass label scoring, in one invocation on the same model and reviews.

Before (the evaluation up to commit 830f3d6): one right-padded sequence per (review, label) pair, every label's
sequence runs the whole prompt (``sequence_log_probs``). After: ``ModelPredictor.score_choices``, which runs each
prompt once and feeds only the label tokens on top of its KV cache (``score_continuations``). Both score the same
K reviews in batches of the same size; the two are timed alternately (after, before, after, before, ...) for
``--repeats`` rounds after one untimed warm-up batch, and the medians and the range are reported with the largest
difference between the two score matrices.

Usage:
    python benchmarks/label_scoring.py [--model smollm2-135m] [--data ../shared/data/imdb] [--examples 64]
        [--batch-size 8] [--repeats 3] [--threads N] [--method zero-shot|lora]

Prints a markdown table, then where the first batch's time goes (``batch_breakdown``): the per-pair path on the same
reviews, and the one-pass path's prompt pass without a KV cache, with it, and with the label continuations.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from bench_common import add_workload_options, benchmark_parser, parse_benchmark_args

from peftlab.config import MethodConfig, RunConfig
from peftlab.data.batching import collate, left_pad
from peftlab.data.dataset import load_examples
from peftlab.data.encode import EncodedExample
from peftlab.evaluation.generate import ModelPredictor, score_continuations
from peftlab.lab.experiment import build
from peftlab.training.loss import IGNORE_INDEX, sequence_log_probs


@torch.no_grad()
def per_pair_scores(predictor: ModelPredictor, examples: list, choices: list[str]) -> list[list[float]]:
    """The evaluation this replaces, as it was: one sequence per (prompt, choice), batched by length."""
    encoder, method = predictor.encoder, predictor.method
    choice_ids = [encoder.target_ids(c) for c in choices]
    pairs = []
    for example in examples:
        prompt = encoder.prompt_ids(example)
        pairs += [EncodedExample(input_ids=prompt + c, labels=[IGNORE_INDEX] * len(prompt) + c) for c in choice_ids]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].input_ids))
    scores = [0.0] * len(pairs)
    for start in range(0, len(order), predictor.batch_size):
        idx = order[start:start + predictor.batch_size]
        batch = collate([pairs[i] for i in idx], predictor.pad_id)
        inputs = method.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"])
        for i, value in zip(idx, sequence_log_probs(method.model, inputs).tolist(), strict=True):
            scores[i] = value
    n = len(choices)
    return [scores[k * n:(k + 1) * n] for k in range(len(examples))]


def prompt_pass_without_cache(predictor: ModelPredictor, prompts: list[list[int]]) -> None:
    """The prompt pass of :func:`~peftlab.evaluation.generate.prefill` with no KV cache kept (``use_cache=False``):
    the same left-padded input and positions, the head on the last position only."""
    method = predictor.method
    input_ids, attention_mask = left_pad(prompts, predictor.pad_id)
    inputs = method.prepare_inputs(input_ids.to(predictor.device), attention_mask.to(predictor.device))
    fed = inputs["input_ids"] if "input_ids" in inputs else inputs["inputs_embeds"]
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)[:, -fed.shape[1]:]
    method.model(**inputs, position_ids=positions, use_cache=False, logits_to_keep=1)


@torch.no_grad()
def batch_breakdown(predictor: ModelPredictor, examples: list, labels: list[str], repeats: int) -> str:
    """Where the first batch's time goes, medians of ``repeats`` rounds: the per-pair path on the same reviews
    (one sequence per review and label), then the one-pass path's prompt pass without a KV cache, with it (each
    label cut to its first token, which the prompt pass scores), and with the whole labels (plus one pass per
    label for its other tokens). Their differences are the cost of keeping the cache and of the continuations."""
    encode = predictor.encoder.encode_prompts
    first = sorted(examples, key=lambda e: len(encode([e])[0]))[:predictor.batch_size]
    prompts = encode(first)
    choices = predictor.encoder.encode_targets(labels)
    method, pad, device = predictor.method, predictor.pad_id, predictor.device
    parts: dict[str, Callable[[], object]] = {
        "per pair": lambda: per_pair_scores(predictor, first, labels),
        "prompt pass, no cache": lambda: prompt_pass_without_cache(predictor, prompts),
        "prompt pass": lambda: score_continuations(method, prompts, [c[:1] for c in choices], pad, device),
        "whole labels": lambda: score_continuations(method, prompts, choices, pad, device),
    }
    seconds: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(repeats):
        for name, run in parts.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    med = {name: statistics.median(v) for name, v in seconds.items()}
    whole = med["whole labels"]
    return (f"first batch: {len(prompts)} prompts ({sum(map(len, prompts))} tokens), labels of "
            f"{[len(c) for c in choices]} tokens; medians: per pair {med['per pair']:.2f} s "
            f"({len(prompts) * len(choices)} sequences); one pass: prompt pass without a KV cache "
            f"{med['prompt pass, no cache']:.2f} s, with it {med['prompt pass']:.2f} s, with the label continuations "
            f"{whole:.2f} s (continuations {(whole - med['prompt pass']) / whole:.0%} of the batch, keeping the cache "
            f"{(med['prompt pass'] - med['prompt pass, no cache']) / whole:.0%}); per pair / one pass "
            f"{med['per pair'] / whole:.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    add_workload_options(parser, data="../shared/data/imdb", examples=64, batch_size=8,
                         examples_help="test reviews scored per timing",
                         batch_help="sequences (before) / prompts (after) per batch")
    parser.add_argument("--method", default="zero-shot", help="zero-shot, or a method name with default options")
    args = parse_benchmark_args(parser, argv)
    cfg = RunConfig()
    cfg.model.name, cfg.task.name, cfg.data.path = args.model, "classification", args.data
    if args.method != "zero-shot":
        cfg.method = MethodConfig(args.method, {})
    cfg.validate()
    setup = build(cfg)
    examples, _ = load_examples(cfg.data, setup.task, cfg.data.test_split, limit=args.examples, sample_seed=0)
    train, _ = load_examples(cfg.data, setup.task, cfg.data.train_split, limit=200, sample_seed=0)
    setup.task.fit_labels(train)
    predictor = setup.predictor()
    predictor.batch_size = args.batch_size
    setup.method.model.eval()
    labels = list(setup.task.labels)
    predictor.score_choices(examples[:args.batch_size], labels)  # warm-up (allocator, threads)
    times: dict[str, list[float]] = {"after": [], "before": []}
    results: dict[str, list[list[float]]] = {}
    variants = {"after": predictor.score_choices, "before": lambda e, c: per_pair_scores(predictor, e, c)}
    for _ in range(args.repeats):
        for name, score in variants.items():
            start = time.perf_counter()
            results[name] = score(examples, labels)
            times[name].append(time.perf_counter() - start)
    diff = max(abs(a - b) for ra, rb in zip(results["after"], results["before"], strict=True)
               for a, b in zip(ra, rb, strict=True))
    prompt_tokens = sum(len(p) for p in predictor.encoder.encode_prompts(examples))
    print(f"{args.model}, {args.method}, {len(examples)} reviews of {args.data} ({prompt_tokens} prompt tokens, "
          f"labels {labels}), batch {args.batch_size}, {torch.get_num_threads()} threads, {args.repeats} repeats\n")
    print("| scoring | median s | range s | reviews/s |\n|---|---|---|---|")
    for name in ("before", "after"):
        med = statistics.median(times[name])
        print(f"| {name} | {med:.2f} | {min(times[name]):.2f}-{max(times[name]):.2f} | {len(examples) / med:.2f} |")
    ratio = statistics.median(times["before"]) / statistics.median(times["after"])
    pairs = [b / a for a, b in zip(times["after"], times["before"], strict=True)]
    print(f"\nspeed-up (median before / median after): {ratio:.2f}x; per round: "
          f"{', '.join(f'{p:.2f}x' for p in pairs)}; max |score difference| = {diff:.2e}")
    print(batch_breakdown(predictor, examples, labels, args.repeats))


if __name__ == "__main__":
    main()
