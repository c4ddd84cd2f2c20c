"""Evaluation generation: peftlab's eval path against ``generate()`` on a PEFT model with the same adapter weights,
on the same CNN/DailyMail test articles, in the same batches, greedy, and a check that the outputs are identical.

peftlab side: ``ModelPredictor.generate`` (the predictor ``peftlab eval`` uses: prompts sorted by length,
left-padded batches, one prefill through the method's ``prepare_inputs``, then a KV-cache loop). PEFT side: the same
prompt ids in the same batches, left-padded, through ``generate(do_sample=False, num_beams=1)``, cut at the first
EOS and decoded the same way. The PEFT adapter's weights are made non-trivial (seeded) and copied into peftlab's
method, so both sides hold the same adapter.

Fair timing: the prompts are tokenized once, before any timer, and both sides consume those token ids; each side
first generates one untimed warm-up batch; then ``--repeats`` timed rounds run the two sides in rotated order
(peftlab first in even rounds, PEFT first in odd ones). A mergeable adapter (LoRA on an fp32 base) is merged on both
sides (peftlab's ``merge()``, PEFT's ``merge_and_unload()``), as evaluation does; ``--unmerged`` also times both
sides unmerged first, ``--no-merge`` only unmerged. Every phase reports per-side median seconds with their range
and the per-round ratios with their median.

Usage: python benchmarks/speed/gen_compare.py [--model smollm2-135m] [--method lora-qv] [--examples 100]
       [--batch-size 16] [--max-new-tokens 100] [--repeats 3] [--unmerged] [--out FILE]
Prints a summary and one ``SPEED_RESULT {json}`` line; exits with status 1 when any output differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from speed_common import (
    DEFAULT_DATA_ROOT,
    DTYPES,
    METHODS,
    PEFTLAB_DTYPES,
    WORKLOADS,
    apply_reference,
    choice,
    emit,
    run_order,
    write_random_model,
)
from speed_report import spread
from torch import nn

from peftlab.config import DataConfig, MethodConfig, RunConfig
from peftlab.data.batching import left_pad
from peftlab.data.dataset import load_examples
from peftlab.evaluation.generate import ModelPredictor, eos_token_ids
from peftlab.lab.experiment import Setup, build
from peftlab.models.loading import pretrained_source

PEFT_PREFIX = "base_model.model."
GEN_METHODS = ("lora-qv", "lora-all", "prompt-tuning", "prefix-tuning")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="model.name; with --random-init: the tokenizer source")
    p.add_argument("--random-init", "--model-config", dest="random_init", default=None,
                   help="a random-weight model from a config: tiny | llama-1b | path/to/config.json")
    p.add_argument("--method", default="lora-qv", help=f"one of {', '.join(GEN_METHODS)}")
    p.add_argument("--examples", type=int, default=100, help="the first N test articles")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter weights")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per phase, the two sides in rotated order")
    p.add_argument("--unmerged", action="store_true", help="also time both sides with LoRA unmerged (before merging)")
    p.add_argument("--no-merge", action="store_true", help="time both sides with LoRA unmerged only")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--out", type=Path, default=None, help="write the result (with every output pair) as JSON")
    args = p.parse_args(argv)
    choice(args.method, GEN_METHODS, "--method")
    choice(args.dtype, DTYPES, "--dtype")
    if min(args.examples, args.batch_size, args.max_new_tokens, args.repeats) < 1:
        raise SystemExit("--examples, --batch-size, --max-new-tokens and --repeats must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def peftlab_setup(args: argparse.Namespace, model: str) -> Setup:
    workload, method = WORKLOADS["cnndm"], METHODS[args.method]
    cfg = RunConfig()
    cfg.model.name, cfg.model.dtype = model, PEFTLAB_DTYPES[args.dtype]
    cfg.task.name = workload.task
    cfg.task.max_source_tokens, cfg.task.max_target_tokens = workload.max_source_tokens, workload.max_target_tokens
    cfg.method = MethodConfig(method.peftlab_name, dict(method.options))
    cfg.eval.batch_size, cfg.eval.max_new_tokens = args.batch_size, args.max_new_tokens
    cfg.train.device, cfg.train.seed = args.device, args.seed
    cfg.validate()
    return build(cfg)


def reference_model(args: argparse.Namespace, model: str, device: torch.device) -> nn.Module:
    """A PEFT model on a second copy of the base, its adapter made non-trivial (seeded)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(pretrained_source(model), dtype=DTYPES[args.dtype])
    torch.manual_seed(args.seed)
    reference = apply_reference(base, args.method)
    embedding = base.get_input_embeddings().weight
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if not p.requires_grad:
                continue
            p.data = p.data.float()  # trained weights are fp32 in peftlab, whatever the base dtype
            if "lora_B" in name:  # PEFT initialises B = 0 (an identity update); a small random B changes outputs
                p.normal_(0.0, 0.01)
            elif name.endswith("prompt_encoder.default.embedding.weight") and args.method == "prompt-tuning":
                rows = torch.randint(0, embedding.shape[0], (p.shape[0],))  # like peftlab's vocab init
                p.copy_(embedding[rows].float())
    return reference.to(device).eval()


def adapter_state(reference: nn.Module, method: str) -> dict[str, torch.Tensor]:
    """The PEFT adapter's weights under peftlab's keys (the layouts match; see tests/test_peft_parity.py)."""
    import peft

    if method == "prefix-tuning":
        return dict(reference.prompt_encoder["default"].state_dict())
    return {k.removeprefix(PEFT_PREFIX): v for k, v in peft.get_peft_model_state_dict(reference).items()}


class TokenIdPrompts:
    """Stands in for ``PromptEncoder`` in ``ModelPredictor``: the "examples" are already prompt token ids.

    The prompts are tokenized once before timing; handing the ids to the predictor this way keeps tokenization out
    of peftlab's timer, as it is out of PEFT's (``generate`` takes ids).
    """

    def encode_prompts(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        return [list(p) for p in prompts]


def peft_generate(reference: nn.Module, prompts: list[list[int]], tokenizer: Any, args: argparse.Namespace,
                  autocast: bool, eos: set[int]) -> tuple[list[str], int]:
    """Decoded greedy continuations in ModelPredictor's batches, and the number of generated tokens."""
    device = next(reference.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts, generated = [""] * len(prompts), 0
    for start in range(0, len(order), args.batch_size):
        idx = order[start:start + args.batch_size]
        input_ids, mask = left_pad([prompts[i] for i in idx], pad)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = reference.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=args.max_new_tokens, do_sample=False, num_beams=1,
                                     pad_token_id=pad, eos_token_id=sorted(eos))
        out = out.cpu()
        width = input_ids.shape[1]
        # generate returns prompt + continuation for input_ids; PEFT's soft prompts may return the continuation only.
        new = out[:, width:] if out.shape[1] > width and torch.equal(out[:, :width], input_ids) else out
        for i, row in zip(idx, new.tolist(), strict=True):
            cut = next((k for k, tok in enumerate(row) if tok in eos), len(row))
            generated += cut
            texts[i] = tokenizer.decode(row[:cut], skip_special_tokens=True).strip()
    return texts, generated


Side = Callable[[list[list[int]]], list[str]]


def timed_rounds(sides: dict[str, Side], prompts: list[list[int]], warmup: list[list[int]],
                 repeats: int) -> dict[str, Any]:
    """One untimed warm-up call per side, then ``repeats`` timed rounds of every side in rotated order.

    Returns the run order, each side's seconds per round (in round order) with median and range, the per-round
    ``peft / peftlab`` time ratios (how many times as fast peftlab is) with their median, each side's outputs of
    the first round, and whether every later round reproduced them.
    """
    for side in sides.values():
        side(warmup)  # first-call costs (allocator growth, kernel selection, lazy imports) stay out of the timer
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    outputs: dict[str, list[str]] = {}
    stable = True
    order = run_order(list(sides), repeats)
    for _, name in order:
        start = time.perf_counter()
        texts = sides[name](prompts)
        seconds[name].append(time.perf_counter() - start)
        stable = stable and outputs.setdefault(name, texts) == texts
    ratios = [theirs / ours for ours, theirs in zip(seconds["peftlab"], seconds["peft"], strict=True)]
    return {"order": [name for _, name in order], "seconds": seconds,
            "spread": {name: spread(values) for name, values in seconds.items()}, "ratios": ratios,
            "peftlab_over_peft": spread(ratios)["median"], "outputs": outputs, "repeatable": stable}


def phases(args: argparse.Namespace, setup: Setup) -> list[str]:
    """The weight states to time, in order: unmerged before merged (PEFT's ``merge_and_unload`` is one-way)."""
    mergeable = setup.method.mergeable and args.dtype == "fp32"  # as evaluate_splits does
    if not mergeable or args.no_merge:
        return ["unmerged"]
    return ["unmerged", "merged"] if args.unmerged else ["merged"]


def compare(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """Generate on both sides in every phase, time them, and compare the outputs."""
    warnings.filterwarnings("ignore", message=".*(is_gradient_checkpointing|Position ids are not supported).*")
    setup = peftlab_setup(args, model)
    reference = reference_model(args, model, setup.device)
    setup.method.load_adapter_state_dict(adapter_state(reference, args.method))
    folder = args.data_root / WORKLOADS["cnndm"].folder
    examples, _ = load_examples(DataConfig(path=str(folder)), setup.task, args.split, limit=args.examples)
    prompts = setup.encoder.encode_prompts(examples)  # the only tokenization: outside every timer
    warmup = sorted(prompts, key=len)[:args.batch_size]  # the first batch either side generates
    eos = eos_token_ids(reference.get_base_model(), setup.tokenizer)
    predictor = ModelPredictor(setup.method, setup.tokenizer, TokenIdPrompts(), args.batch_size,
                               setup.cfg.eval.num_beams, setup.device, setup.autocast)
    generated = {"tokens": 0}

    def peft_side(batch: list[list[int]]) -> list[str]:
        texts, generated["tokens"] = peft_generate(reference, batch, setup.tokenizer, args, setup.autocast, eos)
        return texts

    sides = {"peftlab": lambda batch: predictor.generate(batch, args.max_new_tokens), "peft": peft_side}
    results = {}
    for phase in phases(args, setup):
        if phase == "merged":
            setup.method.merge()
            reference = reference.merge_and_unload()  # PEFT's merged model: a plain transformers model
        results[phase] = timed_rounds(sides, prompts, warmup, args.repeats)
    return summarize_phases(args, model, setup, examples, results, generated["tokens"])


def summarize_phases(args: argparse.Namespace, model: str, setup: Setup, examples: list, results: dict[str, Any],
                     generated: int) -> dict[str, Any]:
    """The result record: per-phase timings and output checks; the headline is the last (merged if any) phase."""
    head = results[list(results)[-1]]
    ours, theirs = head["outputs"]["peftlab"], head["outputs"]["peft"]
    differ = {phase: [i for i, (a, b) in enumerate(zip(r["outputs"]["peftlab"], r["outputs"]["peft"], strict=True))
                      if a != b] for phase, r in results.items()}
    first = next((d for d in differ.values() if d), [])
    return {
        "method": args.method, "model": model, "examples": len(examples), "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "dtype": args.dtype, "device": str(setup.device),
        "threads": torch.get_num_threads(), "repeats": args.repeats, "peftlab_merged": "merged" in results,
        "generated_tokens": generated, "tokenized_once": True,
        "phases": {phase: {k: v for k, v in r.items() if k != "outputs"} | {"n_different": len(differ[phase])}
                   for phase, r in results.items()},
        "peftlab_seconds": head["spread"]["peftlab"]["median"], "peft_seconds": head["spread"]["peft"]["median"],
        "peftlab_over_peft": head["peftlab_over_peft"],
        "identical": not any(differ.values()), "n_different": sum(len(d) for d in differ.values()),
        "different": [{"id": examples[i].id, "peftlab": ours[i], "peft": theirs[i]} for i in first[:5]],
        "outputs": [{"id": e.id, "peftlab": a, "peft": b} for e, a, b in zip(examples, ours, theirs, strict=True)],
    }


def summary_line(result: dict[str, Any]) -> str:
    """One line per phase: median seconds (range) per side and the median per-round speed ratio."""
    lines = [f"{result['examples']} articles, batch {result['batch_size']}, greedy, up to {result['max_new_tokens']} "
             f"new tokens ({result['generated_tokens']} generated), {result['repeats']} rounds per phase, "
             f"outputs identical: {result['identical']} ({result['n_different']} differ)"]
    for phase, r in result["phases"].items():
        cells = [f"{name} {s['median']:.2f} s ({s['min']:.2f}-{s['max']:.2f})" for name, s in r["spread"].items()]
        lines.append(f"  {phase}: " + ", ".join(cells) + f"; peftlab {r['peftlab_over_peft']:.2f}x as fast "
                     "(median of rounds: " + ", ".join(f"{x:.2f}" for x in r["ratios"]) + ")")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="peftlab-gen-") as tmp:
        model = args.model
        if args.random_init:
            model = str(write_random_model(args.random_init, pretrained_source(args.model), Path(tmp) / "model",
                                           args.dtype, args.seed))
        result = compare(args, model)
    print(summary_line(result), file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    emit({k: v for k, v in result.items() if k != "outputs"})
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["identical"] else 1)
