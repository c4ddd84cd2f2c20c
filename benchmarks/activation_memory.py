"""Where a training step's memory goes, and what two levers change: LoRA (q, v) training steps on batches of B random
sequences of length T in three settings per length,

    glibc    the C library's default malloc, a dynamic mmap threshold (peftlab's default)
    fixed    the mmap threshold fixed at 128 KiB (``train.release_freed_memory=true``, training/host_memory.py)
    ckpt     glibc + gradient checkpointing (``train.gradient_checkpointing``, ``checkpointing.checkpoint_blocks``)

As in summarization (long source, short target), only the last ``--target`` positions of each sequence carry a label,
so the output head's logits do not hide what the blocks' activations cost.

Each setting runs in a fresh subprocess, so its peak resident memory (``ru_maxrss``) is its own; "train peak" is
that peak minus the RSS right after the model is loaded (the activations, gradients and optimizer state of the
training steps). "saved" is what autograd holds for the backward pass at the end of the first forward (the saved
tensors of the graph, each storage counted once, model weights excluded): the part of the train peak that is
activations rather than allocator slack. On CUDA the peak allocated GPU memory is reported too. Seconds/step is the
median of the timed steps (after one warm-up step). All settings of a length must give the same first-step loss.

Usage:
    python benchmarks/activation_memory.py [--model smollm2-135m] [--batch 4] [--lengths 256 512 1024]
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
# name -> (glibc mmap threshold fixed, gradient checkpointing); the first is the baseline of the ratios.
SETTINGS = {"glibc": (False, False), "fixed": (True, False), "ckpt": (False, True)}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def saved_tensor_mib(loss: torch.Tensor, model: torch.nn.Module) -> float:
    """MiB of the tensors autograd saved for ``loss``'s backward pass, each storage once, model weights excluded.

    Walks the graph from ``loss.grad_fn`` and reads each node's ``_saved_*`` attributes (the saved variables the
    node will unpack in backward). Under gradient checkpointing only the checkpoint's inputs are in the graph.
    """
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total, stack, visited = set(weights), 0, [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                value = getattr(node, attr)
            except RuntimeError:  # a saved variable already freed or not accessible
                continue
            for t in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    total += t.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return total / 2**20


def run_setting(model_name: str, batch: int, length: int, target: int, steps: int, setting: str,
                device: str) -> dict[str, Any]:
    """Load the model, apply LoRA, time ``steps`` + 1 training steps in ``setting``; the measurements as a dict."""
    from transformers import AutoModelForCausalLM

    from peftlab.methods import get_method
    from peftlab.models.checkpointing import checkpoint_blocks
    from peftlab.models.loading import pretrained_source
    from peftlab.training.host_memory import release_freed_memory
    from peftlab.training.loss import target_only_loss

    fixed_threshold, checkpointing = SETTINGS[setting]
    model = AutoModelForCausalLM.from_pretrained(pretrained_source(model_name), dtype=torch.float32).to(device)
    spec = get_method("lora")
    method = spec.apply(model, spec.build_config(dict(LORA_OPTIONS)))
    if checkpointing:
        checkpoint_blocks(model)
    if fixed_threshold:
        release_freed_memory()  # what the Trainer does with train.release_freed_memory=true
    loaded_rss = peak_rss_mib()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    optimizer = torch.optim.AdamW(method.trainable_parameters().values(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    model.train()
    seconds, losses, saved = [], [], float("nan")
    for step in range(steps + 1):
        ids = torch.randint(0, vocab, (batch, length), generator=generator).to(device)  # (B, T)
        t0 = time.perf_counter()
        labels = ids.clone()
        labels[:, :-target] = -100  # loss on the last `target` tokens only
        inputs = method.prepare_inputs(ids, torch.ones_like(ids), labels)
        loss, n = target_only_loss(model, inputs)
        if step == 0 and not checkpointing:  # reading a checkpointed node's saved tensors would recompute it
            saved = saved_tensor_mib(loss, model)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        losses.append(float(loss) / n)
    result = {"length": length, "setting": setting, "seconds_per_step": statistics.median(seconds[1:]),
              "peak_rss_mib": peak_rss_mib(), "loaded_rss_mib": loaded_rss, "saved_mib": saved,
              "first_loss": losses[0]}
    if device.startswith("cuda"):
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def spawn(args: argparse.Namespace, length: int, setting: str) -> dict[str, Any]:
    """One setting in a fresh interpreter; its JSON result line."""
    command = [sys.executable, __file__, "--worker", setting, "--model", args.model, "--batch", str(args.batch),
               "--lengths", str(length), "--target", str(args.target), "--steps", str(args.steps),
               "--device", args.device]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker for T={length} setting={setting} failed (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    print(done.stdout.strip().splitlines()[-1], file=sys.stderr, flush=True)  # each result as soon as it is in
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]], device: str) -> str:
    """Markdown: one line per (length, setting), with time and train-peak ratios to the length's glibc line."""
    cuda = device.startswith("cuda")
    header = ("| T | setting | s/step | time x | peak RSS MiB | train peak MiB | saved MiB | memory x |"
              + (" peak CUDA MiB |" if cuda else ""))
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    base_of = {r["length"]: r for r in rows if r["setting"] == next(iter(SETTINGS))}
    for r in rows:
        base = base_of[r["length"]]
        train = r["peak_rss_mib"] - r["loaded_rss_mib"]
        base_train = base["peak_rss_mib"] - base["loaded_rss_mib"]
        line = (f"| {r['length']} | {r['setting']} | {r['seconds_per_step']:.3f} | "
                f"{r['seconds_per_step'] / base['seconds_per_step']:.2f} | {r['peak_rss_mib']:.0f} | {train:.0f} | "
                f"{r['saved_mib']:.0f} | {train / max(base_train, 1e-9):.2f} |")
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
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        help="settings to run (the first is the baseline of the ratios)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--worker", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(run_setting(args.model, args.batch, args.lengths[0], min(args.target, args.lengths[0]),
                                     args.steps, args.worker, args.device)))
        return
    settings = [name for name in SETTINGS if name in args.settings]  # the baseline first
    rows = []
    for length in args.lengths:
        group = [spawn(args, length, setting) for setting in settings]
        if max(r["first_loss"] for r in group) - min(r["first_loss"] for r in group) > 1e-4:
            raise RuntimeError(f"T={length}: the first-step loss differs between settings: {group}")
        rows += group
    print(f"model {args.model}, LoRA {LORA_OPTIONS}, batch {args.batch}, loss on the last {args.target} tokens, "
          f"{args.steps} timed steps, {torch.get_num_threads()} threads, {args.device}\n")
    print(table(rows, args.device))


if __name__ == "__main__":
    main()
