"""Shared pieces of the speed benchmark: the methods and workloads, the prepared data file, random-init models,
work counters, memory measurement and the FLOP model. Imported by the harness and by every worker (as a plain
module next to them: the workers are run as scripts, so this folder is on ``sys.path``).

Every variant (peftlab, PEFT + Trainer, the course recipe) reads the same prepared data file: the same examples,
tokenized once with peftlab's ``PromptEncoder`` (prompt template, source truncation, target-only labels), and the
same batches in the same order (peftlab's length-bucketed order; the Trainer side uses a sequential sampler over
the examples laid out in that order). The work per real token is therefore the same in every variant, and the
harness checks that each worker saw exactly the planned real tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
RESULT_MARKER = "SPEED_RESULT "  # libraries print to stdout too; the harness reads only lines with this prefix
# Harness order; each repeat starts one further along (see harness.run_order). "trainer-expert" is (b'): PEFT +
# Trainer with the head applied to labelled positions only, the strongest set-up a Trainer user can write.
# "peftlab-compile" is (a'): peftlab with train.compile=true; it runs only when --variants names it (it compiles for
# minutes first, outside the measured window).
VARIANTS = ("peftlab", "peftlab-compile", "trainer", "trainer-expert", "course")
DEFAULT_VARIANTS = ("peftlab", "trainer", "trainer-expert", "course")
VARIANT_LETTERS = {"peftlab": "a", "peftlab-compile": "a'", "trainer": "b", "trainer-expert": "b'", "course": "c"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PEFTLAB_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Workload:
    """A task and data folder, with the token limits every variant uses."""

    name: str
    folder: str  # under the data root
    task: str
    max_source_tokens: int
    max_target_tokens: int
    labels: tuple[str, ...] | None = None

    @property
    def max_length(self) -> int:
        """The longest possible sequence: what the course recipe pads every example to."""
        return self.max_source_tokens + self.max_target_tokens


WORKLOADS: dict[str, Workload] = {
    # Articles truncated to a 512-token prompt (template included), summaries up to 128 tokens (EOS included).
    "cnndm": Workload("cnndm", "cnn_dailymail", "summarization", 512, 128),
    # Reviews in a prompt of at most 512 tokens; the target is the label word(s) plus EOS.
    "imdb": Workload("imdb", "imdb", "classification", 512, 8, ("negative", "positive")),
}


@dataclass(frozen=True)
class BenchMethod:
    """One benchmarked method: peftlab's name and options, and what the Trainer side builds for it."""

    key: str
    peftlab_name: str
    options: dict[str, Any]
    reference: str  # "peft-lora" | "peft-prompt" | "peft-prefix" | "head-only" | "all-params" (hand-written)


METHODS: dict[str, BenchMethod] = {
    "lora-qv": BenchMethod("lora-qv", "lora", {"r": 16, "alpha": 32.0, "target_modules": ["q", "v"]}, "peft-lora"),
    "lora-all": BenchMethod("lora-all", "lora", {"r": 16, "alpha": 32.0, "target_modules": "all-linear"},
                            "peft-lora"),
    "prompt-tuning": BenchMethod("prompt-tuning", "prompt-tuning", {"n_tokens": 20}, "peft-prompt"),
    # peftlab's defaults (MLP reparametrization, width 512) = PEFT's prefix_projection=True, encoder_hidden_size=512.
    "prefix-tuning": BenchMethod("prefix-tuning", "prefix-tuning", {"n_tokens": 20, "hidden_size": 512},
                                 "peft-prefix"),
    "last-layer": BenchMethod("last-layer", "last-layer", {}, "head-only"),
    "full": BenchMethod("full", "full", {}, "all-params"),
}


def method_lr(key: str) -> float:
    """The learning rate every variant uses for a method: peftlab's default for it (speed does not depend on it)."""
    from peftlab.methods import get_method

    return get_method(METHODS[key].peftlab_name).default_lr


def choice(value: str, choices: dict[str, Any] | tuple[str, ...], what: str) -> str:
    """``value`` if it is one of ``choices``, else a ``SystemExit`` naming ``what`` and the valid choices."""
    if value not in choices:
        raise SystemExit(f"{what}: {value!r} is not one of {', '.join(choices)}")
    return value


def run_order(variants: list[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, variant) in run order: repeat r is the variants rotated to start at index r mod k.

    Used for the training workers (harness) and the two generation sides (gen_compare).

    Whatever drifts during an invocation (clock boost, cache and page state, a neighbour's load) then falls on every
    variant in turn rather than always on the same one, and each repeat still runs every variant back to back, so
    the per-repeat ratios compare runs made under nearly the same conditions.
    """
    k = len(variants)
    return [(r, variants[(r + i) % k]) for r in range(repeats) for i in range(k)]


# ---------------------------------------------------------------------------------------------------- worker CLI
def worker_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every training worker takes (the harness passes them; they also work by hand)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help="model.name: alias smollm2-135m, a HF folder or a .gguf file")
    p.add_argument("--data", required=True, type=Path, help="prepared data file written by harness.py")
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps before the measured window (>= 1)")
    p.add_argument("--steps", type=int, default=6, help="measured optimizer steps")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 (bf16: frozen base in bf16, trained weights fp32, "
                                                   "bf16 autocast)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, required=True,
                   help="scratch folder (peftlab's metrics log, the Trainer's output_dir)")
    return p


def check_worker_args(args: argparse.Namespace) -> None:
    """Validate the shared arguments and apply the thread count."""
    choice(args.method, METHODS, "--method")
    choice(args.dtype, DTYPES, "--dtype")
    if args.warmup < 1 or args.steps < 1:
        # At least one warmup step: the window then starts after a finished step on both sides, never at setup.
        raise SystemExit(f"--warmup and --steps must be >= 1 (got {args.warmup}, {args.steps})")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device is available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)


def emit(record: dict[str, Any]) -> None:
    """Print the worker's one result line (the harness picks it out of stdout by its marker)."""
    sys.stdout.write(RESULT_MARKER + json.dumps(record) + "\n")
    sys.stdout.flush()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that a timestamp means what it says (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ prepared data
def load_prepared(path: Path) -> dict[str, Any]:
    """The data file written by ``harness.py``: examples (input_ids, labels), batches, workload settings."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--data {path}: cannot read the prepared data file: {exc}") from exc
    missing = {"workload", "examples", "batches", "max_length", "pad_id"} - set(data)
    if missing:
        raise SystemExit(f"--data {path}: not a prepared data file (missing {', '.join(sorted(missing))})")
    return data


def needed_batches(warmup: int, steps: int) -> int:
    """Batches a run consumes: the warmup and measured steps (the run stops right after the window)."""
    return warmup + steps


def ordered_examples(data: dict[str, Any], warmup: int, steps: int) -> list[dict[str, list[int]]]:
    """The examples laid out batch after batch in the planned order (for a sequential sampler)."""
    batches = data["batches"]
    if len(batches) < needed_batches(warmup, steps):
        raise SystemExit(f"{data['workload']}: the data file plans {len(batches)} batches, the run needs "
                         f"{needed_batches(warmup, steps)}; prepare more examples")
    return [data["examples"][i] for batch in batches for i in batch]


# ------------------------------------------------------------------------------------------- random-init models
def preset_config(name: str, tokenizer: Any) -> Any:
    """A Llama config from a preset name (``tiny``, ``llama-1b``) or a JSON file, sized to ``tokenizer``."""
    from transformers import AutoConfig, LlamaConfig

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
    vocab = len(tokenizer)
    if name == "tiny":
        return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           tie_word_embeddings=True, **ids)
    if name == "llama-1b":
        # Llama 3.2 1B's shape (16 blocks, d=2048, GQA 32/8 heads, SwiGLU 8192) with this tokenizer's vocabulary:
        # ~0.97B block parameters + 0.10B tied embeddings.
        return LlamaConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                           max_position_embeddings=2048, rope_theta=500000.0, rms_norm_eps=1e-5,
                           tie_word_embeddings=True, **ids)
    path = Path(name)
    if not path.is_file():
        raise SystemExit(f"--random-init {name!r}: not a preset (tiny, llama-1b) nor a JSON config file")
    try:
        values = json.loads(path.read_text())
    except ValueError as exc:
        raise SystemExit(f"--random-init {path}: not valid JSON: {exc}") from exc
    if not isinstance(values, dict) or "model_type" not in values:
        raise SystemExit(f"--random-init {path}: expected a config object with a 'model_type' key")
    if values.get("vocab_size", vocab) < vocab:
        raise SystemExit(f"--random-init {path}: vocab_size {values['vocab_size']} is smaller than the tokenizer's "
                         f"{vocab}")
    values = {"vocab_size": vocab, **ids, **values}
    return AutoConfig.for_model(values.pop("model_type"), **values)


def write_random_model(config_name: str, tokenizer_source: str, folder: Path, dtype: str, seed: int) -> Path:
    """Save a randomly initialised model (``preset_config``) with the tokenizer as a HF folder; returns it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config = preset_config(config_name, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(DTYPES[dtype])
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# -------------------------------------------------------------------------------------------- reference set-up
def apply_reference(model: nn.Module, method_key: str) -> nn.Module:
    """The reference set-up of a method: a PEFT model, or the base model with hand-set ``requires_grad``."""
    import peft

    from peftlab.models.arch import is_tied, output_head, resolve_targets, untie_output_head

    method = METHODS[method_key]
    opts = method.options
    if method.reference == "peft-lora":
        targets = resolve_targets(model, opts["target_modules"])  # the layers peftlab adapts, by full name
        if any(t.part is not None for t in targets):
            raise SystemExit(f"{method_key}: targets are slices of a fused layer, which PEFT cannot target")
        config = peft.LoraConfig(r=opts["r"], lora_alpha=opts["alpha"], lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=[t.name for t in targets])
        return peft.get_peft_model(model, config)
    if method.reference == "peft-prompt":
        return peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                  num_virtual_tokens=opts["n_tokens"]))
    if method.reference == "peft-prefix":
        return peft.get_peft_model(model, peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=opts["n_tokens"], prefix_projection=True,
            encoder_hidden_size=opts["hidden_size"]))
    train_all = method.reference == "all-params"
    for p in model.parameters():
        p.requires_grad_(train_all)
    if not train_all:  # last layer: a trainable copy of a tied head, so the input embeddings stay fixed
        if is_tied(model):
            untie_output_head(model)
        for p in output_head(model).parameters():
            p.requires_grad_(True)
    return model


# ------------------------------------------------------------------------------------------------ what was run
def model_facts(base: nn.Module, trainable: list[nn.Parameter]) -> dict[str, Any]:
    """Sizes the FLOP model needs, read off the (method-applied) base model.

    ``body_params``: parameters inside the transformer blocks (matmul weights, adapters included; the embedding
    lookup costs no FLOPs); ``head_params``: the output head's weight; ``body_trainable_params``: trained ones
    inside the blocks; ``grads_into_body``: whether anything trained sits at or below the blocks' outputs (then
    backward runs through the whole body; not for last-layer).
    """
    from peftlab.models.arch import output_head, transformer_blocks

    block_ids = {id(p) for p in transformer_blocks(base).parameters()}
    head_ids = {id(p) for p in output_head(base).parameters()}
    cfg = base.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {
        "body_params": sum(p.numel() for p in transformer_blocks(base).parameters()),
        "head_params": output_head(base).weight.numel(),
        "total_params": sum(p.numel() for p in base.parameters()),  # parameters() yields a tied matrix once
        "trainable_params": sum(p.numel() for p in trainable),
        "body_trainable_params": sum(p.numel() for p in trainable if id(p) in block_ids),
        "head_trainable": any(id(p) in head_ids for p in trainable),
        "grads_into_body": any(id(p) not in head_ids for p in trainable),
        "n_layers": len(transformer_blocks(base)),
        "attn_width": heads * head_dim,
    }


class WorkCounter:
    """Counts what the model actually computes: positions through the decoder trunk and rows through the head.

    A forward pre-hook on the trunk reads the (B, T') shape of ``input_ids``/``inputs_embeds`` (T' includes soft
    prompt positions and padding); a forward hook on the head counts the rows it projects (peftlab: labelled
    positions only; a Hugging Face forward: every position). Only training forwards run while it is attached.
    """

    def __init__(self, base: nn.Module) -> None:
        from peftlab.models.arch import output_head, trunk

        self.positions = 0
        self.attn_sq = 0  # sum over sequences of T'^2 (attention work grows with the square of the length)
        self.head_rows = 0
        self.forwards = 0
        self._handles = [trunk(base).register_forward_pre_hook(self._on_trunk, with_kwargs=True),
                         output_head(base).register_forward_hook(self._on_head)]

    def _on_trunk(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        fed = kwargs.get("inputs_embeds")
        if fed is None:
            fed = kwargs.get("input_ids", args[0] if args else None)
        if fed is not None:
            self.positions += int(fed.shape[0] * fed.shape[1])
            self.attn_sq += int(fed.shape[0] * fed.shape[1] ** 2)
            self.forwards += 1

    def _on_head(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.head_rows += int(args[0].shape[:-1].numel())

    def totals(self) -> dict[str, int]:
        return {"positions": self.positions, "attn_sq": self.attn_sq, "head_rows": self.head_rows,
                "forwards": self.forwards}


class StepWindow:
    """Wall time and counter totals over the measured steps ``warmup + 1 .. warmup + steps``.

    Both sides call :meth:`on_step_end` after every optimizer step. At the two window boundaries (the ends of steps
    ``warmup`` and ``warmup + steps``) queued GPU work is waited for and the counters are read; in between only a
    timestamp is taken, so a GPU run is not forced to synchronize every step (its per-step times are then host
    times, while the window total is exact).
    """

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.times: dict[int, float] = {}
        self.snapshots: dict[int, dict[str, int]] = {}

    @property
    def last(self) -> int:
        return self.warmup + self.steps

    def on_step_end(self, step: int, totals: Callable[[], dict[str, int]]) -> None:
        boundary = step in (self.warmup, self.last)
        if boundary:
            synchronize(self.device)
        self.times[step] = time.perf_counter()
        if boundary:
            self.snapshots[step] = totals()

    def done(self, step: int) -> bool:
        return step >= self.last

    def result(self) -> dict[str, Any]:
        """Window totals: ``seconds``, ``real_tokens``, ``tokens_per_s``, counter differences, ``step_seconds``."""
        if self.warmup not in self.snapshots or self.last not in self.snapshots:
            raise RuntimeError(f"the run ended before step {self.last} (steps seen: {sorted(self.times)})")
        a, b = self.snapshots[self.warmup], self.snapshots[self.last]
        out: dict[str, Any] = {key: b[key] - a[key] for key in b}
        out["seconds"] = self.times[self.last] - self.times[self.warmup]
        out["step_seconds"] = [self.times[k] - self.times[k - 1] for k in range(self.warmup + 1, self.last + 1)]
        out["tokens_per_s"] = out["real_tokens"] / max(out["seconds"], 1e-9)
        return out


# ------------------------------------------------------------------------------------------------------ memory
def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class MemoryProbe:
    """Peak memory of the training phase, measured the same way in every worker.

    ``mark_loaded()`` is called once the model is loaded, the method applied and the data read (before the
    optimizer exists). CPU: the RSS then is ``loaded_rss_bytes``; the kernel's RSS high-water mark is reset
    (``echo 5 > /proc/self/clear_refs``), so ``VmHWM`` at the end is the peak RSS *during training*
    (``train_peak_rss_bytes``; if the reset is impossible, the lifetime ``ru_maxrss`` is used and
    ``memory_kind`` says so). CUDA: ``torch.cuda.max_memory_allocated`` since a reset at the same point.
    ``peak_memory_bytes`` is the headline figure: the CUDA peak on a GPU, the training-phase peak RSS on CPU.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loaded_rss: int | None = None
        self.hwm_reset = False
        self.cuda_loaded = 0

    def mark_loaded(self) -> None:
        import gc

        gc.collect()
        self.loaded_rss = _status_bytes("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.hwm_reset = _status_bytes("VmHWM") is not None
        except OSError:
            self.hwm_reset = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda_loaded = torch.cuda.memory_allocated(self.device)

    def report(self) -> dict[str, Any]:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: kilobytes on Linux, bytes on macOS
        lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        train_peak = (_status_bytes("VmHWM") if self.hwm_reset else None) or lifetime
        loaded = self.loaded_rss or 0
        out: dict[str, Any] = {
            "loaded_rss_bytes": loaded, "lifetime_peak_rss_bytes": lifetime, "train_peak_rss_bytes": train_peak,
            "train_peak_over_loaded_bytes": train_peak - loaded,
            "memory_kind": "cpu_rss_hwm_since_load" if self.hwm_reset else "cpu_ru_maxrss_lifetime",
            "peak_memory_bytes": train_peak,
        }
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            out.update({"cuda_loaded_bytes": self.cuda_loaded, "cuda_peak_bytes": peak,
                        "cuda_peak_over_loaded_bytes": peak - self.cuda_loaded, "memory_kind": "cuda_max_allocated",
                        "peak_memory_bytes": peak})
        return out


def run_facts(args: argparse.Namespace, variant: str, data: dict[str, Any]) -> dict[str, Any]:
    """The identifying fields every worker record starts with."""
    return {"variant": variant, "method": args.method, "workload": data["workload"], "model": args.model,
            "dtype": args.dtype, "device": str(args.device), "threads": torch.get_num_threads(),
            "batch_size": data["batch_size"], "warmup_steps": args.warmup, "measured_steps": args.steps,
            "seed": args.seed, "lr": method_lr(args.method), "pid": os.getpid()}


# ---------------------------------------------------------------------------------------------------- FLOPs
def training_flops(facts: dict[str, Any], body_positions: float, head_rows: float, attn_sq: float) -> float:
    """Estimated FLOPs of training on the given work (matmul weights plus causal attention scores).

    Per position through the body: forward 2 N_body, backward activation gradients 2 N_body when anything below
    the head trains (``grads_into_body``), weight gradients 2 N_body_trainable. Per head row: 2 N_head forward,
    2 N_head for the gradient into the body, 2 N_head for the head's own weight gradient when it trains.
    Attention scores and weighted values: 4 d_attn T_k FLOPs per query per layer forward, causal so T_k averages
    T/2: 2 d_attn T^2 per sequence of length T and layer (``attn_sq`` = sum of T^2), times 3 with backward.
    """
    g = 1.0 if facts["grads_into_body"] else 0.0
    body = body_positions * (2 * facts["body_params"] * (1 + g) + 2 * facts["body_trainable_params"])
    head = head_rows * 2 * facts["head_params"] * (1 + g + (1.0 if facts["head_trainable"] else 0.0))
    attention = attn_sq * 2 * facts["attn_width"] * facts["n_layers"] * (1 + 2 * g)
    return body + head + attention
