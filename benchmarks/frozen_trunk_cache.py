"""What frozen-trunk caching (``train.cache_frozen_trunk``) saves in last-layer or last-blocks tuning: the same
training run (K examples, E epochs, same seed, same batch order) with the cache off and then on, one after the other
in this process on the same loaded model (the trained weights are reset to their starting values in between).

With the cache on, epoch 1 runs the trunk as usual and keeps, per example, what the frozen part gives: for
last-layer the labelled-position hidden states (epochs 2..E run only the output head and the cross-entropy), for
last-blocks the hidden states entering the first trained block (epochs 2..E run only the top ``--n-blocks`` blocks,
the norm and the head). Reported: seconds per epoch of both runs, the speed-up of epochs 2..E (mean epoch time
off / on) and of the whole run, the tokens that ran the frozen part, and the largest difference between the two
runs' trained weights (float rounding only: a cached row's features come from the batch it was first seen in).

Usage:
    python benchmarks/frozen_trunk_cache.py [--method last-layer|last-blocks] [--n-blocks 2]
        [--model smollm2-135m] [--data ../shared/data/cnn_dailymail] [--task summarization] [--examples 32]
        [--epochs 3] [--batch-size 4] [--threads N] [--device cpu]

``--data demo`` uses the built-in table-to-text demo set. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from peftlab.config import MethodConfig, RunConfig
from peftlab.data.dataset import load_examples
from peftlab.data.encode import IGNORE_INDEX
from peftlab.lab.experiment import Setup, build, set_seed
from peftlab.methods import get_method
from peftlab.training.trainer import Trainer

METHODS = ("last-layer", "last-blocks")
# The task a data folder holds when --task is not given (the folder names of ../shared/data).
TASK_BY_FOLDER = {"demo": "table-to-text", "cnn_dailymail": "summarization", "imdb": "classification",
                  "e2e_nlg": "table-to-text"}


def run_config(args: argparse.Namespace) -> RunConfig:
    """The run's configuration (validated); ``train.cache_frozen_trunk`` is set per run."""
    cfg = RunConfig()
    cfg.model.name = args.model
    cfg.task.name = args.task or TASK_BY_FOLDER.get(Path(args.data).name, "summarization")
    cfg.data.path, cfg.data.max_train = args.data, args.examples
    cfg.method = MethodConfig(args.method, {"n_blocks": args.n_blocks} if args.method == "last-blocks" else {})
    cfg.train.epochs, cfg.train.batch_size, cfg.train.device = float(args.epochs), args.batch_size, args.device
    cfg.validate()
    return cfg


def train_once(setup: Setup, cfg: RunConfig, examples: list, start: dict[str, torch.Tensor], mode: str,
               workdir: Path) -> dict[str, Any]:
    """Train from ``start`` with ``train.cache_frozen_trunk=mode``; epoch times, final loss and trained weights."""
    setup.method.load_adapter_state_dict(start)
    cfg.train.cache_frozen_trunk = mode
    set_seed(cfg.train.seed)
    trainer = Trainer(setup.method, examples, [], cfg.train, workdir / mode, setup.tokenizer.pad_token_id,
                      cfg.train.lr or get_method(cfg.method.name).default_lr, None, setup.device, None,
                      setup.autocast)
    state = trainer.fit()
    return {"mode": mode, "cached": state.trunk_cache, "cache_mib": state.trunk_cache_bytes / 2**20,
            "trunk_tokens": state.trunk_input_tokens, "input_tokens": state.input_tokens,
            "epoch_seconds": list(state.epoch_seconds), "final_loss": state.loss_curve[-1][1],
            "weights": {k: p.detach().to("cpu", copy=True) for k, p in trainer.params.items()}}


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: one line per run; the cached line gives the speed-ups over the uncached one."""
    off = runs[0]
    lines = ["| cache | epoch 1 s | epochs 2.. s (mean) | total s | later-epoch speed-up | total speed-up | "
             "cache MiB | frozen-part tokens / input tokens | final loss |", "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        seconds, base = run["epoch_seconds"], off["epoch_seconds"]
        later = statistics.fmean(seconds[1:]) if len(seconds) > 1 else float("nan")
        base_later = statistics.fmean(base[1:]) if len(base) > 1 else float("nan")
        lines.append(f"| {run['mode']} | {seconds[0]:.2f} | {later:.3f} | {sum(seconds):.2f} | "
                     f"{base_later / later:.1f}x | {sum(base) / sum(seconds):.2f}x | {run['cache_mib']:.1f} | "
                     f"{run['trunk_tokens']} / {run['input_tokens']} | {run['final_loss']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=METHODS, default="last-layer", help="the method trained")
    parser.add_argument("--n-blocks", type=int, default=2, help="last-blocks: how many top blocks train")
    parser.add_argument("--model", default="smollm2-135m", help="alias, local HF folder, .gguf or hub id")
    parser.add_argument("--data", default="../shared/data/cnn_dailymail", help="data folder, or 'demo'")
    parser.add_argument("--task", default=None, help="task; default: from the data folder's name")
    parser.add_argument("--examples", type=int, default=32, help="training examples (K)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs (E >= 2: epoch 1 fills the cache)")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per batch")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the cache only pays off from epoch 2)")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = run_config(args)
    setup = build(cfg)
    train, _ = load_examples(cfg.data, setup.task, cfg.data.train_split, limit=args.examples,
                             sample_seed=cfg.data.seed)
    setup.task.fit_labels(train)
    examples = setup.encoder.encode_many(train)
    start = {k: v.detach().clone() for k, v in setup.method.trainable_parameters().items()}
    with tempfile.TemporaryDirectory(prefix="frozen-trunk-cache-") as workdir:
        runs = [train_once(setup, cfg, examples, start, mode, Path(workdir)) for mode in ("off", "on")]
    if runs[0]["cached"] or not runs[1]["cached"]:
        raise RuntimeError("the cache did not follow train.cache_frozen_trunk (off, on)")
    diff = max(float((runs[1]["weights"][k] - w).abs().max()) for k, w in runs[0]["weights"].items())
    targets = sum(sum(t != IGNORE_INDEX for t in e.labels[1:]) for e in examples)
    method = cfg.method.name + (f" (n_blocks={args.n_blocks})" if args.method == "last-blocks" else "")
    print(f"model {args.model}, {cfg.task.name} on {args.data}, {method}, {len(examples)} examples "
          f"({targets} target tokens), {args.epochs} epochs, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {args.device}\n")
    print(table(runs))
    print(f"\nmax |trained(on) - trained(off)| = {diff:.3g} over {len(runs[0]['weights'])} tensors (weights up to "
          f"{max(float(w.abs().max()) for w in runs[0]['weights'].values()):.3g})")


if __name__ == "__main__":
    main()
