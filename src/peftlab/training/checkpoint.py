"""Atomic checkpoints and atomic file writes.

A checkpoint is a folder ``<out>/checkpoints/step-NNNNNNN/`` holding ``weights.safetensors`` (the trainable
parameters), ``best.safetensors`` (the best weights so far, when validation has run), ``trainer.pt`` (optimizer and
scheduler state and the torch RNG state: tensors and plain containers only, loaded with ``weights_only=True``) and
``state.json``. It is written under a temporary name and renamed into place, then ``<out>/checkpoints/LATEST`` is
replaced atomically to point at it, and only then are older checkpoints deleted. A crash at any moment leaves the
previous checkpoint intact and ``LATEST`` pointing at a complete folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def save_checkpoint(out_dir: str | Path, step: int, weights: dict[str, torch.Tensor],
                    best: dict[str, torch.Tensor] | None, trainer_state: dict[str, Any],
                    state: dict[str, Any]) -> Path:
    """Write checkpoint ``step`` atomically, point ``LATEST`` at it, then delete the older ones."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:07d}.", dir=root))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "weights.safetensors")
        if best is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in best.items()}, tmp / "best.safetensors")
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "LATEST", final.name + "\n")
    for old in root.glob("step-*"):
        if old.is_dir() and old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The folder ``LATEST`` points at, or None when there is no complete checkpoint."""
    root = Path(out_dir) / "checkpoints"
    pointer = root / "LATEST"
    if not pointer.exists():
        return None
    folder = root / pointer.read_text().strip()
    return folder if (folder / "state.json").exists() else None


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict, dict]:
    """(weights, best weights or None, trainer state, state) from a checkpoint folder."""
    weights = load_file(folder / "weights.safetensors")
    best_path = folder / "best.safetensors"
    best = load_file(best_path) if best_path.exists() else None
    trainer_state = torch.load(folder / "trainer.pt", weights_only=True)
    state = json.loads((folder / "state.json").read_text())
    return weights, best, trainer_state, state
