"""fp32 against bf16 autocast on this CPU, in one invocation: training steps, label scoring and greedy generation
on SmolLM2-135M with real CNN/DM and IMDB data, with what bf16 changes in the results.

Variants (each timed on the same inputs, in an order rotated per round, so none always runs first):

* ``fp32``: the default, exact path.
* ``autocast``: ``torch.autocast(bfloat16)`` alone over fp32 weights, as ``train.bf16=true`` ran before
  ``frozen_matmul_weights_in_bf16``: autocast casts every FROZEN weight again at every forward.
* ``bf16``: what ``train.bf16=true`` runs now: autocast with the frozen matmul weights cast to bf16 once
  (``peftlab.models.loading.frozen_matmul_weights_in_bf16``); bitwise the numbers of ``autocast``, which is checked.

Parts (``--parts``, comma-separated):

* ``train``: LoRA and prompt-tuning steps (AdamW, target-only loss) on CNN/DM (batch 4, ~600 tokens) and IMDB
  (batch 8, ~300 tokens) training batches from the length-bucketed order. One model per variant (same seed), so
  each trains on its own; each step runs the three variants on one batch. Step 0 is a warm-up (not counted); steps
  1..N are batches of shapes not seen before; then batches 1..2 again (shapes already seen), which measures the
  one-off cost of a new (batch, length) shape. Prints tokens/s per variant and the loss of every step
  (fp32 vs bf16: the loss-curve difference).
* ``score``: zero-shot IMDB label scoring (``ModelPredictor.score_choices``) of ``--reviews`` test reviews:
  seconds per variant; max |log-prob difference|, same argmax and accuracy, fp32 vs bf16.
* ``generate``: zero-shot greedy CNN/DM summaries (``ModelPredictor.generate``) of ``--articles`` test articles
  in one batch: seconds, split into the prefill and the decode steps; identical outputs and ROUGE, fp32 vs bf16.

Usage:
    python benchmarks/bf16_cpu.py [--parts train,score,generate] [--repeats 3] [--threads 2]
        [--train-steps 4] [--reviews 64] [--articles 16] [--max-new-tokens 100] [--data-root ../shared/data]
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from bench_common import benchmark_parser, parse_benchmark_args

import peftlab.evaluation.generate as generate_module
from peftlab.config import load_config
from peftlab.data.batching import collate, length_bucketed_batches
from peftlab.data.dataset import load_examples
from peftlab.evaluation.generate import ModelPredictor
from peftlab.evaluation.metrics import rouge_scores
from peftlab.lab.experiment import build
from peftlab.models.loading import cpu_has_fast_bf16, frozen_matmul_weights_in_bf16
from peftlab.training.loss import target_only_loss

VARIANTS = ("fp32", "autocast", "bf16")
TRAIN_WORKLOADS = {  # name: (config overrides, batch size)
    "cnndm": (["task.name=summarization", "data.path={root}/cnn_dailymail", "task.max_source_tokens=512",
               "task.max_target_tokens=128"], 4),
    "imdb": (["task.name=classification", "data.path={root}/imdb", "task.max_source_tokens=512",
              "task.max_target_tokens=8"], 8),
}


def rotated(round_index: int, names: tuple[str, ...] = VARIANTS) -> list[str]:
    k = round_index % len(names)
    return list(names[k:] + names[:k])


@contextlib.contextmanager
def precision(variant: str, model: torch.nn.Module) -> Iterator[None]:
    """The variant's numeric setting around a forward (and backward)."""
    if variant == "fp32":
        yield
        return
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if variant == "bf16":
            with frozen_matmul_weights_in_bf16(model):
                yield
        else:
            yield


class Predictor(ModelPredictor):
    """The shipped predictor with the benchmark's variant in place of its own autocast setting."""

    def __init__(self, variant: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.variant = variant

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        with precision(self.variant, self.method.model):
            yield


def summary(values: list[float], fmt: str = ".1f") -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


# ---- training ------------------------------------------------------------------------------------------------
def train_part(root: str, method: str, workload: str, steps: int) -> None:
    overrides, batch_size = TRAIN_WORKLOADS[workload]
    cfg = load_config(None, [f"method={method}", f"train.batch_size={batch_size}"]
                      + [o.format(root=root) for o in overrides])
    setups = {v: build(cfg) for v in VARIANTS}  # same seed: the same initial weights in each
    first = setups["fp32"]
    train, _ = load_examples(cfg.data, first.task, cfg.data.train_split, limit=16 * batch_size, sample_seed=0)
    if hasattr(first.task, "fit_labels"):
        first.task.fit_labels(train)
    encoded = first.encoder.encode_many(train)
    order = length_bucketed_batches([len(e.input_ids) for e in encoded], batch_size, seed=0, epoch=0)
    batches = [collate([encoded[i] for i in idx], first.tokenizer.pad_token_id) for idx in order]
    plan = [("warm-up", batches[0])] + [("new shape", b) for b in batches[1:steps + 1]]
    plan += [("seen shape", b) for b in batches[1:3]]
    optimizers = {v: torch.optim.AdamW(s.method.trainable_parameters().values(), lr=3e-4) for v, s in setups.items()}
    for s in setups.values():
        s.method.model.train()
    seconds: dict[tuple[str, str], list[float]] = {}
    losses: dict[str, list[float]] = {v: [] for v in VARIANTS}
    shapes = []
    for step, (kind, batch) in enumerate(plan):
        shapes.append(tuple(batch["input_ids"].shape))
        tokens = int(batch["attention_mask"].sum())
        for variant in rotated(step):
            method = setups[variant].method
            start = time.perf_counter()
            inputs = method.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"])
            with precision(variant, method.model):
                loss, n = target_only_loss(method.model, inputs)
                (loss / n).backward()
            optimizers[variant].step()
            optimizers[variant].zero_grad(set_to_none=True)
            seconds.setdefault((variant, kind), []).append(tokens / (time.perf_counter() - start))
            losses[variant].append(float(loss) / n)
    print(f"\n### train {method} on {workload}: batch shapes {shapes} (step 0 warm-up, then new shapes, then the "
          f"first two again)\n")
    print("| variant | tok/s new shapes | tok/s seen shapes | tok/s warm-up step |\n|---|---|---|---|")
    for v in VARIANTS:
        print(f"| {v} | {summary(seconds[v, 'new shape'], '.0f')} | {summary(seconds[v, 'seen shape'], '.0f')} | "
              f"{seconds[v, 'warm-up'][0]:.0f} |")
    fp, bf = statistics.median(seconds["fp32", "new shape"]), statistics.median(seconds["bf16", "new shape"])
    ac = statistics.median(seconds["autocast", "new shape"])
    print(f"\nbf16 / fp32 (new shapes, median tok/s): {bf / fp:.2f}x; autocast alone / fp32: {ac / fp:.2f}x")
    print("loss per step fp32: " + ", ".join(f"{x:.4f}" for x in losses["fp32"]))
    print("loss per step bf16: " + ", ".join(f"{x:.4f}" for x in losses["bf16"]))
    diffs = [abs(a - b) for a, b in zip(losses["fp32"], losses["bf16"], strict=True)]
    relative = max(d / a for d, a in zip(diffs, losses["fp32"], strict=True))
    print(f"max |loss fp32 - loss bf16| = {max(diffs):.4f} (relative {relative:.2%}); "
          f"autocast and bf16 losses bitwise equal: {losses['autocast'] == losses['bf16']}")


# ---- evaluation ----------------------------------------------------------------------------------------------
def eval_setup(root: str, task: str, data: str):
    cfg = load_config(None, ["method=lora", f"task.name={task}", f"data.path={root}/{data}",
                             "task.max_source_tokens=512"])
    setup = build(cfg)  # LoRA at init (B = 0): the base model's outputs, as zero-shot
    setup.method.model.eval()
    return cfg, setup


def score_part(root: str, reviews: int, repeats: int) -> None:
    cfg, setup = eval_setup(root, "classification", "imdb")
    examples, _ = load_examples(cfg.data, setup.task, cfg.data.test_split, limit=reviews, sample_seed=0)
    train, _ = load_examples(cfg.data, setup.task, cfg.data.train_split, limit=200, sample_seed=0)
    setup.task.fit_labels(train)
    labels = list(setup.task.labels)
    predictors = {v: Predictor(v, setup.method, setup.tokenizer, setup.encoder, 8) for v in VARIANTS}
    for p in predictors.values():
        p.score_choices(examples[:8], labels)  # warm-up
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    scores: dict[str, torch.Tensor] = {}
    for r in range(repeats):
        for v in rotated(r):
            start = time.perf_counter()
            scores[v] = torch.tensor(predictors[v].score_choices(examples, labels))
            times[v].append(time.perf_counter() - start)
    tokens = sum(len(p) for p in setup.encoder.encode_prompts(examples))
    gold = torch.tensor([labels.index(e.target) for e in examples])
    print(f"\n### score: zero-shot IMDB, {len(examples)} test reviews ({tokens} prompt tokens), labels {labels}, "
          f"batch 8\n")
    print("| variant | median s (range) | reviews/s | accuracy |\n|---|---|---|---|")
    for v in VARIANTS:
        acc = float((scores[v].argmax(1) == gold).float().mean())
        print(f"| {v} | {summary(times[v], '.2f')} | {len(examples) / statistics.median(times[v]):.2f} | {acc:.1%} |")
    diff = (scores["fp32"] - scores["bf16"]).abs()
    margin = (scores["fp32"][:, 0] - scores["fp32"][:, 1]).abs()
    same = float((scores["fp32"].argmax(1) == scores["bf16"].argmax(1)).float().mean())
    print(f"\nfp32 / bf16 time: {statistics.median(times['fp32']) / statistics.median(times['bf16']):.2f}x; "
          f"fp32 / autocast alone: {statistics.median(times['fp32']) / statistics.median(times['autocast']):.2f}x")
    print(f"fp32 vs bf16: max |log-prob difference| {float(diff.max()):.4f}, median {float(diff.median()):.4f}; "
          f"same argmax {same:.1%}; median |label margin| in fp32 {float(margin.median()):.3f}; "
          f"autocast and bf16 bitwise equal: {torch.equal(scores['autocast'], scores['bf16'])}")


def generate_part(root: str, articles: int, max_new_tokens: int, repeats: int) -> None:
    cfg, setup = eval_setup(root, "summarization", "cnn_dailymail")
    examples, _ = load_examples(cfg.data, setup.task, cfg.data.test_split, limit=articles, sample_seed=0)
    predictors = {v: Predictor(v, setup.method, setup.tokenizer, setup.encoder, articles) for v in VARIANTS}
    prefill_seconds: list[float] = []
    original_prefill: Callable = generate_module.prefill

    def timed_prefill(*args, **kwargs):
        start = time.perf_counter()
        out = original_prefill(*args, **kwargs)
        prefill_seconds.append(time.perf_counter() - start)
        return out

    generate_module.prefill = timed_prefill  # greedy_generate looks prefill up in its module at each call
    for p in predictors.values():
        p.generate(examples[:2], 4)  # warm-up
    total: dict[str, list[float]] = {v: [] for v in VARIANTS}
    pre: dict[str, list[float]] = {v: [] for v in VARIANTS}
    texts: dict[str, list[str]] = {}
    for r in range(repeats):
        for v in rotated(r):
            prefill_seconds.clear()
            start = time.perf_counter()
            texts[v] = predictors[v].generate(examples, max_new_tokens)
            total[v].append(time.perf_counter() - start)
            pre[v].append(sum(prefill_seconds))
    generate_module.prefill = original_prefill
    tokens = sum(len(p) for p in setup.encoder.encode_prompts(examples))
    new = sum(len(setup.tokenizer(t).input_ids) for t in texts["fp32"])
    print(f"\n### generate: zero-shot greedy CNN/DM, {len(examples)} test articles in one batch ({tokens} prompt "
          f"tokens), up to {max_new_tokens} new tokens (~{new} in the fp32 outputs)\n")
    refs = [e.references for e in examples]
    print(f"| variant | total s | prefill s | decode s | {'/'.join(rouge_scores(texts['fp32'], refs))} |")
    print("|---|---|---|---|---|")
    for v in VARIANTS:
        decode = [t - p for t, p in zip(total[v], pre[v], strict=True)]
        rouge = rouge_scores(texts[v], refs)
        print(f"| {v} | {summary(total[v])} | {summary(pre[v])} | {summary(decode)} | "
              f"{'/'.join(f'{x:.2f}' for x in rouge.values())} |")
    same = sum(a == b for a, b in zip(texts["fp32"], texts["bf16"], strict=True))
    med = {v: statistics.median(total[v]) for v in VARIANTS}
    pre_ratio = statistics.median(pre["fp32"]) / statistics.median(pre["bf16"])
    print(f"\nfp32 / bf16 time: {med['fp32'] / med['bf16']:.2f}x (prefill {pre_ratio:.2f}x); "
          f"fp32 / autocast alone: {med['fp32'] / med['autocast']:.2f}x; outputs identical fp32 vs bf16: "
          f"{same}/{len(examples)}; autocast and bf16 identical: {texts['autocast'] == texts['bf16']}")


def machine() -> str:
    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), "unknown CPU")
    return (f"{name}, {os.cpu_count()} CPUs, torch {torch.__version__}, capability "
            f"{torch.backends.cpu.get_cpu_capability()}, bf16 units (AMX/AVX512-BF16): {cpu_has_fast_bf16()}, "
            f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, threads=2, repeats_help="rounds of the evaluation parts")
    parser.add_argument("--parts", default="train,score,generate")
    parser.add_argument("--methods", default="lora,prompt-tuning")
    parser.add_argument("--workloads", default="cnndm,imdb")
    parser.add_argument("--train-steps", type=int, default=4, help="measured new-shape steps per training run")
    parser.add_argument("--reviews", type=int, default=64)
    parser.add_argument("--articles", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--data-root", default="../shared/data")
    args = parse_benchmark_args(parser, argv)
    print(machine())
    parts = args.parts.split(",")
    if "train" in parts:
        for workload in args.workloads.split(","):
            for method in args.methods.split(","):
                train_part(args.data_root, method, workload, args.train_steps)
    if "score" in parts:
        score_part(args.data_root, args.reviews, args.repeats)
    if "generate" in parts:
        generate_part(args.data_root, args.articles, args.max_new_tokens, args.repeats)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
