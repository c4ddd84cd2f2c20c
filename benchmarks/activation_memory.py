"""Where a training step's memory goes, and what the memory levers change: training steps of a method (LoRA r=8 q, v
or prompt tuning) on one batch, in these settings,

    glibc      the C library's default malloc, a dynamic mmap threshold (peftlab's default)
    fixed      the mmap threshold fixed at 128 KiB (``train.release_freed_memory=true``, training/host_memory.py)
    ckpt       glibc + gradient checkpointing (``train.gradient_checkpointing``, ``checkpointing.checkpoint_blocks``)
    recompute  glibc + elementwise recomputation (``train.recompute_elementwise``, ``models/recompute.py``)
    fixed-recompute  both: the resident peak then follows what is live rather than glibc's fragmentation

The batch is B random sequences of length T with a label on the last ``--target`` positions (``--data random``: as
in summarization, a long source and a short target, so the output head's logits do not hide what the blocks'
activations cost), or the first B examples of a seeded sample of CNN/DailyMail training articles
(``--data cnndm``: read from ``--data-root``/cnn_dailymail, article up to 512 prompt tokens, summary up to 128, as
``benchmarks/speed``'s cnndm workload), the same batch at every step.

Each (method, setting) runs in a fresh subprocess, so its peak resident memory (``ru_maxrss``) is its own; "train
peak" is that peak minus the RSS right after the model is loaded (the activations, gradients and optimizer state of
the training steps). "saved" is what autograd keeps for the backward pass of the first (untimed) step, seen by
saved-tensor hooks around the forward (each storage once, model weights excluded): the part of the train peak that
is activations rather than allocator slack, independent of the machine's load. Under checkpointing the blocks' own
hooks keep their tensors out of sight, so it is not reported there. On CUDA the peak allocated GPU memory is reported
too. Seconds/step is the median of the timed steps (after one warm-up step). All settings of a method must give the
same first-step loss. ``--repeats R`` runs every setting R times, repeat r in the order rotated to start at setting
r mod k, and reports medians with their ranges; the ratios to the first setting are ratios of medians.

Usage:
    python benchmarks/activation_memory.py [--model smollm2-135m] [--methods lora prompt-tuning] [--batch 4]
        [--data random|cnndm] [--lengths 256 512 1024] [--target 64] [--steps 3] [--repeats 1]
        [--settings glibc fixed ckpt recompute fixed-recompute] [--threads N] [--device cpu]

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
from pathlib import Path
from typing import Any

import torch

METHOD_OPTIONS = {"lora": {"r": 8, "target_modules": ["q", "v"]}, "prompt-tuning": {"n_tokens": 20}}
# name -> (glibc mmap threshold fixed, gradient checkpointing, elementwise recomputation); the first is the baseline
# of the ratios.
SETTINGS = {"glibc": (False, False, False), "fixed": (True, False, False), "ckpt": (False, True, False),
            "recompute": (False, False, True), "fixed-recompute": (True, False, True)}
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class SavedTensorBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes autograd keeps for the backward pass while active, each storage once, model weights excluded.

    Hooks set inside (elementwise recomputation's recipe hooks) hand every tensor they really keep on to these; a
    gradient checkpoint's own hooks do not, so under checkpointing this sees only what is kept outside the blocks.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.bytes = 0
        super().__init__(self._pack, lambda packed: packed)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided and t.untyped_storage().data_ptr() not in self.seen:
            self.seen.add(t.untyped_storage().data_ptr())
            self.bytes += t.untyped_storage().nbytes()
        return t


def load_batch(args: argparse.Namespace, length: int, target: int, vocab: int) -> dict[str, torch.Tensor]:
    """The one batch every step trains on: random ids with the last ``target`` labelled, or CNN/DM examples."""
    if args.data == "random":
        ids = torch.randint(0, vocab, (args.batch, length), generator=torch.Generator().manual_seed(0))  # (B, T)
        labels = ids.clone()
        labels[:, :-target] = -100  # loss on the last `target` tokens only
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    from transformers import AutoTokenizer

    from peftlab.config import DataConfig, TaskConfig
    from peftlab.data.batching import collate
    from peftlab.data.dataset import load_examples
    from peftlab.data.encode import PromptEncoder
    from peftlab.models.loading import pretrained_source
    from peftlab.tasks import get_task

    task_cfg = TaskConfig(name="summarization", max_source_tokens=512, max_target_tokens=128)
    task = get_task(task_cfg)
    examples, _ = load_examples(DataConfig(path=str(args.data_root / "cnn_dailymail")), task, "train",
                                limit=args.batch, sample_seed=0)
    tokenizer = AutoTokenizer.from_pretrained(pretrained_source(args.model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return collate(PromptEncoder(tokenizer, task, task_cfg).encode_many(examples), pad_id)


def run_setting(args: argparse.Namespace, method_name: str, length: int, setting: str) -> dict[str, Any]:
    """Load the model, apply the method, time ``steps`` + 1 training steps in ``setting``; the measurements."""
    from transformers import AutoModelForCausalLM

    from peftlab.methods import get_method
    from peftlab.models.checkpointing import checkpoint_blocks
    from peftlab.models.loading import pretrained_source
    from peftlab.models.recompute import recompute_elementwise
    from peftlab.training.host_memory import release_freed_memory
    from peftlab.training.loss import target_only_loss

    fixed_threshold, checkpointing, recompute = SETTINGS[setting]
    device = args.device
    model = AutoModelForCausalLM.from_pretrained(pretrained_source(args.model), dtype=torch.float32).to(device)
    spec = get_method(method_name)
    torch.manual_seed(0)  # the same initial weights (a soft prompt's random init) in every setting
    method = spec.apply(model, spec.build_config(dict(METHOD_OPTIONS[method_name])))
    if recompute:
        recompute_elementwise(model)
    if checkpointing:
        checkpoint_blocks(model)
    if fixed_threshold:
        release_freed_memory()  # what the Trainer does with train.release_freed_memory=true
    batch = {k: v.to(device) for k, v in load_batch(args, length, min(args.target, length),
                                                      model.get_input_embeddings().num_embeddings).items()}
    loaded_rss = peak_rss_mib()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    optimizer = torch.optim.AdamW(method.trainable_parameters().values(), lr=1e-4)
    model.train()
    seconds, losses, saved = [], [], float("nan")
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        inputs = method.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"])
        if step == 0:
            counter = SavedTensorBytes(model)
            with counter:
                loss, n = target_only_loss(model, inputs)
            saved = counter.bytes / 2**20 if not checkpointing else float("nan")
        else:
            loss, n = target_only_loss(model, inputs)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        losses.append(float(loss) / n)
    result = {"method": method_name, "length": length, "setting": setting,
              "tokens": int(batch["attention_mask"].sum()), "shape": list(batch["input_ids"].shape),
              "seconds_per_step": statistics.median(seconds[1:]), "peak_rss_mib": peak_rss_mib(),
              "loaded_rss_mib": loaded_rss, "saved_mib": saved, "first_loss": losses[0]}
    if device.startswith("cuda"):
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def spawn(args: argparse.Namespace, method: str, length: int, setting: str) -> dict[str, Any]:
    """One setting in a fresh interpreter; its JSON result line."""
    command = [sys.executable, __file__, "--worker", setting, "--methods", method, "--model", args.model,
               "--batch", str(args.batch), "--lengths", str(length), "--target", str(args.target),
               "--steps", str(args.steps), "--device", args.device, "--data", args.data,
               "--data-root", str(args.data_root)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker for {method} T={length} setting={setting} failed (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    print(done.stdout.strip().splitlines()[-1], file=sys.stderr, flush=True)  # each result as soon as it is in
    return json.loads(done.stdout.strip().splitlines()[-1])


def _span(values: list[float], fmt: str) -> str:
    """Median, with the min-max range when there is more than one value."""
    median = format(statistics.median(values), fmt)
    return median if len(values) == 1 else f"{median} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def table(rows: list[dict[str, Any]], device: str) -> str:
    """Markdown: one line per (method, length, setting) over its repeats, medians (ranges), with the ratios of the
    medians to the group's first setting."""
    cuda = device.startswith("cuda")
    header = ("| method | T | setting | s/step | time x | train peak MiB | memory x | saved MiB | saved x |"
              + (" peak CUDA MiB |" if cuda else ""))
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    groups: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["length"]), {}).setdefault(r["setting"], []).append(r)
    for (method, _), by_setting in groups.items():
        base = next(iter(by_setting.values()))
        base_time = statistics.median(r["seconds_per_step"] for r in base)
        base_train = statistics.median(r["peak_rss_mib"] - r["loaded_rss_mib"] for r in base)
        base_saved = statistics.median(r["saved_mib"] for r in base)
        for setting, runs in by_setting.items():
            times = [r["seconds_per_step"] for r in runs]
            train = [r["peak_rss_mib"] - r["loaded_rss_mib"] for r in runs]
            saved = statistics.median(r["saved_mib"] for r in runs)
            saved_cells = ("- | - |" if saved != saved else f"{saved:.0f} | {saved / base_saved:.2f} |")
            line = (f"| {method} | {runs[0]['shape'][1]} | {setting} | {_span(times, '.2f')} | "
                    f"{statistics.median(times) / base_time:.2f} | {_span(train, '.0f')} | "
                    f"{statistics.median(train) / max(base_train, 1e-9):.2f} | {saved_cells}")
            if cuda:
                line += f" {statistics.median(r['peak_cuda_mib'] for r in runs):.0f} |"
            lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias, local HF folder, .gguf or hub id")
    parser.add_argument("--methods", nargs="+", default=["lora"], choices=list(METHOD_OPTIONS),
                        help=f"methods to train ({METHOD_OPTIONS})")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (B)")
    parser.add_argument("--data", choices=["random", "cnndm"], default="random",
                        help="random ids, or the first B of a seeded sample of CNN/DM training articles")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="folder holding cnn_dailymail/")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024],
                        help="sequence lengths (T) of random data (cnndm: the batch's own)")
    parser.add_argument("--target", type=int, default=64, help="random data: labelled positions at the end")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every setting, in rotated order")
    parser.add_argument("--settings", nargs="+", default=["glibc", "fixed", "ckpt"], choices=list(SETTINGS),
                        help="settings to run (the first is the baseline of the ratios)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--worker", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(run_setting(args, args.methods[0], args.lengths[0], args.worker)))
        return
    settings = list(dict.fromkeys(args.settings))  # as given: the first is the baseline
    lengths = args.lengths if args.data == "random" else [0]
    rows = []
    for method in args.methods:
        for length in lengths:
            group = []
            for repeat in range(args.repeats):
                shift = repeat % len(settings)
                group += [spawn(args, method, length, s) for s in settings[shift:] + settings[:shift]]
            losses = [r["first_loss"] for r in group]
            if max(losses) - min(losses) > 1e-4:
                raise RuntimeError(f"{method} T={length}: the first-step loss differs between settings: {group}")
            rows += sorted(group, key=lambda r: settings.index(r["setting"]))
    shapes = sorted({f"{r['shape'][0]} x {r['shape'][1]} ({r['tokens']} real tokens)" for r in rows})
    print(f"model {args.model}, methods {[(m, METHOD_OPTIONS[m]) for m in args.methods]}, data {args.data} "
          f"{', '.join(shapes)}, {args.steps} timed steps x {args.repeats} repeats, {torch.get_num_threads()} "
          f"threads, {args.device}\n")
    print(table(rows, args.device))


if __name__ == "__main__":
    main()
