"""Evaluation generation: peftlab's eval path against ``generate()`` on a PEFT model with the same adapter weights,
on the same CNN/DailyMail test articles, in the same batches, greedy, and a check that the outputs are identical.

peftlab side: ``ModelPredictor.generate`` (the predictor ``peftlab eval`` uses: prompts sorted by length,
left-padded batches, one prefill through the method's ``prepare_inputs``, then a KV-cache loop), with LoRA merged
into fp32 base weights as ``evaluate_splits`` does (``--no-merge`` keeps it unmerged). PEFT side: the same prompt
ids in the same batches, left-padded, through ``PeftModel.generate(do_sample=False, num_beams=1)``, cut at the
first EOS and decoded the same way. The PEFT adapter's weights are made non-trivial (seeded) and copied into
peftlab's method, so both sides hold the same adapter.

Usage: python benchmarks/speed/gen_compare.py [--model smollm2-135m] [--method lora-qv] [--examples 100]
       [--batch-size 16] [--max-new-tokens 100] [--out FILE]
Prints a summary and one ``SPEED_RESULT {json}`` line; exits with status 1 when any output differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
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
    write_random_model,
)
from torch import nn

from peftlab.config import DataConfig, MethodConfig, RunConfig
from peftlab.data.batching import left_pad
from peftlab.data.dataset import load_examples
from peftlab.evaluation.generate import eos_token_ids
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
    p.add_argument("--no-merge", action="store_true", help="keep LoRA unmerged on the peftlab side")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--out", type=Path, default=None, help="write the result (with every output pair) as JSON")
    args = p.parse_args(argv)
    choice(args.method, GEN_METHODS, "--method")
    choice(args.dtype, DTYPES, "--dtype")
    if min(args.examples, args.batch_size, args.max_new_tokens) < 1:
        raise SystemExit("--examples, --batch-size and --max-new-tokens must be >= 1")
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


def peft_generate(reference: nn.Module, prompts: list[list[int]], tokenizer: Any, args: argparse.Namespace,
                  autocast: bool) -> tuple[list[str], int]:
    """Decoded greedy continuations in ModelPredictor's batches, and the number of generated tokens."""
    device = next(reference.parameters()).device
    eos = eos_token_ids(reference.get_base_model(), tokenizer)
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


def compare(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """Generate on both sides, time them, and compare the outputs."""
    warnings.filterwarnings("ignore", message=".*(is_gradient_checkpointing|Position ids are not supported).*")
    setup = peftlab_setup(args, model)
    reference = reference_model(args, model, setup.device)
    setup.method.load_adapter_state_dict(adapter_state(reference, args.method))
    folder = args.data_root / WORKLOADS["cnndm"].folder
    examples, _ = load_examples(DataConfig(path=str(folder)), setup.task, args.split, limit=args.examples)
    merged = not args.no_merge and setup.method.mergeable and args.dtype == "fp32"  # as evaluate_splits does
    if merged:
        setup.method.merge()
    start = time.perf_counter()
    ours = setup.predictor().generate(examples, args.max_new_tokens)
    ours_seconds = time.perf_counter() - start
    prompts = setup.encoder.encode_prompts(examples)
    start = time.perf_counter()
    theirs, generated = peft_generate(reference, prompts, setup.tokenizer, args, setup.autocast)
    peft_seconds = time.perf_counter() - start
    differ = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    return {
        "method": args.method, "model": model, "examples": len(examples), "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "dtype": args.dtype, "device": str(setup.device),
        "threads": torch.get_num_threads(), "peftlab_merged": merged, "generated_tokens": generated,
        "peftlab_seconds": ours_seconds, "peft_seconds": peft_seconds,
        "peftlab_examples_per_s": len(examples) / ours_seconds, "peft_examples_per_s": len(examples) / peft_seconds,
        "peftlab_over_peft": peft_seconds / ours_seconds, "identical": not differ, "n_different": len(differ),
        "different": [{"id": examples[i].id, "peftlab": ours[i], "peft": theirs[i]} for i in differ[:5]],
        "outputs": [{"id": e.id, "peftlab": a, "peft": b} for e, a, b in zip(examples, ours, theirs, strict=True)],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="peftlab-gen-") as tmp:
        model = args.model
        if args.random_init:
            model = str(write_random_model(args.random_init, pretrained_source(args.model), Path(tmp) / "model",
                                           args.dtype, args.seed))
        result = compare(args, model)
    print(f"{result['examples']} articles, batch {args.batch_size}, greedy, up to {args.max_new_tokens} new tokens "
          f"({result['generated_tokens']} generated): peftlab {result['peftlab_seconds']:.1f} s "
          f"({'merged' if result['peftlab_merged'] else 'unmerged'}), PEFT generate() {result['peft_seconds']:.1f} s, "
          f"peftlab {result['peftlab_over_peft']:.2f}x as fast; outputs identical: {result['identical']} "
          f"({result['n_different']} differ)", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    emit({k: v for k, v in result.items() if k != "outputs"})
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["identical"] else 1)
