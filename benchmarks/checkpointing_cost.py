"""What gradient checkpointing (``train.gradient_checkpointing``) costs and saves: LoRA (q, v) training steps on
batches of B random sequences of length T, with and without :func:`peftlab.models.arch.checkpoint_blocks`. As in
summarization (long source, short target), only the last ``--target`` positions of each sequence carry a label, so
the output head's logits do not hide what the blocks' activations cost.

Each (T, checkpointing) setting runs in a fresh subprocess, so its peak resident memory (``ru_maxrss``) is its own;
"train peak" is that peak minus the RSS right after the model is loaded (the activations, gradients and optimizer
state of the training steps). On CUDA the peak allocated GPU memory is reported too. Seconds/step is the median of
the timed steps (after one warm-up step). Both runs of a length must give the same first-step loss (checked).

Usage:
    python benchmarks/checkpointing_cost.py [--model smollm2-135m] [--batch 4] [--lengths 256 512 1024]
        [--target 64] [--steps 3] [--threads N] [--device cpu]

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

LORA_OPTIONS = {"r": 8, "target_modules": ["q", "v"]}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_setting(model_name: str, batch: int, length: int, target: int, steps: int, checkpointing: bool,
                device: str) -> dict[str, Any]:
    """Load the model, apply LoRA, time ``steps`` + 1 training steps; the measurements as a dict."""
    from transformers import AutoModelForCausalLM

    from peftlab.methods import get_method
    from peftlab.models.arch import checkpoint_blocks
    from peftlab.models.loading import pretrained_source
    from peftlab.training.loss import target_only_loss

    model = AutoModelForCausalLM.from_pretrained(pretrained_source(model_name), dtype=torch.float32).to(device)
    spec = get_method("lora")
    method = spec.apply(model, spec.build_config(dict(LORA_OPTIONS)))
    if checkpointing:
        checkpoint_blocks(model)
    loaded_rss = peak_rss_mib()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    optimizer = torch.optim.AdamW(method.trainable_parameters().values(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    model.train()
    seconds, losses = [], []
    for _ in range(steps + 1):
        ids = torch.randint(0, vocab, (batch, length), generator=generator).to(device)  # (B, T)
        t0 = time.perf_counter()
        labels = ids.clone()
        labels[:, :-target] = -100  # loss on the last `target` tokens only
        inputs = method.prepare_inputs(ids, torch.ones_like(ids), labels)
        loss, n = target_only_loss(model, inputs)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        losses.append(float(loss) / n)
    result = {"length": length, "checkpointing": checkpointing, "seconds_per_step": statistics.median(seconds[1:]),
              "peak_rss_mib": peak_rss_mib(), "loaded_rss_mib": loaded_rss, "first_loss": losses[0]}
    if device.startswith("cuda"):
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def spawn(args: argparse.Namespace, length: int, checkpointing: bool) -> dict[str, Any]:
    """One setting in a fresh interpreter; its JSON result line."""
    command = [sys.executable, __file__, "--worker", "--model", args.model, "--batch", str(args.batch),
               "--lengths", str(length), "--target", str(args.target), "--steps", str(args.steps),
               "--device", args.device]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if checkpointing:
        command.append("--checkpointing")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker for T={length} checkpointing={checkpointing} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]], device: str) -> str:
    """Markdown: one line per setting; the checkpointed line gives its time and train-peak ratios to the plain one."""
    cuda = device.startswith("cuda")
    header = ("| T | checkpointing | s/step | time x | peak RSS MiB | train peak MiB | memory x |"
              + (" peak CUDA MiB |" if cuda else ""))
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    plain = {r["length"]: r for r in rows if not r["checkpointing"]}
    for r in rows:
        base = plain[r["length"]]
        train = r["peak_rss_mib"] - r["loaded_rss_mib"]
        base_train = base["peak_rss_mib"] - base["loaded_rss_mib"]
        line = (f"| {r['length']} | {'on' if r['checkpointing'] else 'off'} | {r['seconds_per_step']:.3f} | "
                f"{r['seconds_per_step'] / base['seconds_per_step']:.2f} | {r['peak_rss_mib']:.0f} | {train:.0f} | "
                f"{train / max(base_train, 1e-9):.2f} |")
        if cuda:
            line += f" {r['peak_cuda_mib']:.0f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias, local HF folder, .gguf or hub id")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (B)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024], help="sequence lengths (T)")
    parser.add_argument("--target", type=int, default=64, help="labelled positions at the end of each sequence")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(run_setting(args.model, args.batch, args.lengths[0], min(args.target, args.lengths[0]),
                                     args.steps, args.checkpointing, args.device)))
        return
    rows = []
    for length in args.lengths:
        pair = [spawn(args, length, checkpointing) for checkpointing in (False, True)]
        if abs(pair[0]["first_loss"] - pair[1]["first_loss"]) > 1e-4:
            raise RuntimeError(f"T={length}: the first-step loss differs with checkpointing: {pair}")
        rows += pair
    print(f"model {args.model}, LoRA {LORA_OPTIONS}, batch {args.batch}, loss on the last {args.target} tokens, "
          f"{args.steps} timed steps, "
          f"{torch.get_num_threads()} threads, {args.device}\n")
    print(table(rows, args.device))


if __name__ == "__main__":
    main()
