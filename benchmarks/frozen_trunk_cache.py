"""What frozen-trunk caching (``train.cache_frozen_trunk``) saves in last-layer tuning: the same training run (K
examples, E epochs, same seed, same batch order) with the cache off and then on, one after the other in this process
on the same loaded model (the head is reset to its starting weights in between).

With the cache on, epoch 1 runs the trunk as usual (and keeps each example's labelled-position hidden states);
epochs 2..E run only the output head and the cross-entropy. Reported: seconds per epoch of both runs, the speed-up
of epochs 2..E (mean epoch time off / on) and of the whole run, and the largest difference between the two trained
heads (float rounding only: a cached row's features come from the batch it was first seen in).

Usage:
    python benchmarks/frozen_trunk_cache.py [--model smollm2-135m] [--data ../shared/data/cnn_dailymail]
        [--task summarization] [--examples 32] [--epochs 3] [--batch-size 4] [--threads N] [--device cpu]

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

METHOD = "last-layer"
# The task a data folder holds when --task is not given (the folder names of ../shared/data).
TASK_BY_FOLDER = {"demo": "table-to-text", "cnn_dailymail": "summarization", "imdb": "classification",
                  "e2e_nlg": "table-to-text"}


def run_config(args: argparse.Namespace) -> RunConfig:
    """The run's configuration (validated); ``train.cache_frozen_trunk`` is set per run."""
    cfg = RunConfig()
    cfg.model.name = args.model
    cfg.task.name = args.task or TASK_BY_FOLDER.get(Path(args.data).name, "summarization")
    cfg.data.path, cfg.data.max_train = args.data, args.examples
    cfg.method = MethodConfig(METHOD, {})
    cfg.train.epochs, cfg.train.batch_size, cfg.train.device = float(args.epochs), args.batch_size, args.device
    cfg.validate()
    return cfg


def train_once(setup: Setup, cfg: RunConfig, examples: list, start: dict[str, torch.Tensor], mode: str,
               workdir: Path) -> dict[str, Any]:
    """Train from ``start`` with ``train.cache_frozen_trunk=mode``; epoch times, final loss and head weights."""
    setup.method.load_adapter_state_dict(start)
    cfg.train.cache_frozen_trunk = mode
    set_seed(cfg.train.seed)
    trainer = Trainer(setup.method, examples, [], cfg.train, workdir / mode, setup.tokenizer.pad_token_id,
                      cfg.train.lr or get_method(METHOD).default_lr, None, setup.device, None, setup.autocast)
    state = trainer.fit()
    return {"mode": mode, "cached": state.trunk_cache, "cache_mib": state.trunk_cache_bytes / 2**20,
            "epoch_seconds": list(state.epoch_seconds), "final_loss": state.loss_curve[-1][1],
            "weights": {k: p.detach().to("cpu", copy=True) for k, p in trainer.params.items()}}


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: one line per run; the cached line gives the speed-ups over the uncached one."""
    off = runs[0]
    lines = ["| cache | epoch 1 s | epochs 2.. s (mean) | total s | later-epoch speed-up | total speed-up | "
             "cache MiB | final loss |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        seconds, base = run["epoch_seconds"], off["epoch_seconds"]
        later = statistics.fmean(seconds[1:]) if len(seconds) > 1 else float("nan")
        base_later = statistics.fmean(base[1:]) if len(base) > 1 else float("nan")
        lines.append(f"| {run['mode']} | {seconds[0]:.2f} | {later:.3f} | {sum(seconds):.2f} | "
                     f"{base_later / later:.1f}x | {sum(base) / sum(seconds):.2f}x | {run['cache_mib']:.1f} | "
                     f"{run['final_loss']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    print(f"model {args.model}, {cfg.task.name} on {args.data}, {METHOD}, {len(examples)} examples "
          f"({targets} target tokens), {args.epochs} epochs, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {args.device}\n")
    print(table(runs))
    print(f"\nmax |head(on) - head(off)| = {diff:.3g} (head weights up to "
          f"{max(float(w.abs().max()) for w in runs[0]['weights'].values()):.3g})")


if __name__ == "__main__":
    main()
