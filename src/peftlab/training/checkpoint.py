"""Atomic, durable checkpoints, with no pickle anywhere.

A checkpoint is a folder ``<out>/checkpoints/step-NNNNNNN/`` holding ``weights.safetensors`` (the trainable
parameters), ``best.safetensors`` (the best weights so far, when validation has run), ``trainer.safetensors`` +
``trainer.json`` (optimizer and scheduler state and the torch RNG state: every tensor in the safetensors file, the
structure and the plain numbers in JSON, see :func:`split_tensors`) and ``state.json`` (the loop's position, and
``metrics_bytes``: how long ``metrics.jsonl`` was when the checkpoint was taken).

It is written with :func:`~peftlab.durable.durable_folder` (a ``.step-NNNNNNN.*.tmp`` folder, every file
fsynced, renamed into place, parent fsynced), then ``<out>/checkpoints/LATEST`` is replaced durably to point at it,
and only then are older checkpoints deleted. A crash or power cut at any moment leaves ``LATEST`` pointing at a
complete, fsynced folder (or absent: no checkpoint yet).

Checkpoints of older versions held ``trainer.pt`` (a torch pickle); they are refused without being read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from peftlab.durable import (
    durable_folder,
    remove_leftovers,
    save_tensors,
    write_bytes_durably,
)

TENSOR, TUPLE, ITEMS = "__tensor__", "__tuple__", "__items__"


class OldCheckpointError(ValueError):
    """A checkpoint written by an older peftlab (a pickled ``trainer.pt``), which is not unpickled."""


def split_tensors(obj: Any, tensors: dict[str, torch.Tensor], path: str = "t") -> Any:
    """``obj`` as JSON-able data, every tensor moved into ``tensors`` under a path-like key.

    Tuples and dicts with non-string keys (the optimizer's ``{param index: state}``) are tagged, so that
    :func:`join_tensors` rebuilds exactly the original structure and types: a resumed run must see the same values.
    """
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().clone().contiguous()  # clone: safetensors refuses shared storage
        return {TENSOR: path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: split_tensors(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {ITEMS: [[k, split_tensors(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {TUPLE: [split_tensors(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [split_tensors(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"checkpoint state at {path}: {type(obj).__name__} is not a tensor, number, string or container")


def join_tensors(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`split_tensors`."""
    if isinstance(data, list):
        return [join_tensors(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if TENSOR in data:
        return tensors[data[TENSOR]]
    if TUPLE in data:
        return tuple(join_tensors(v, tensors) for v in data[TUPLE])
    if ITEMS in data:
        return {k: join_tensors(v, tensors) for k, v in data[ITEMS]}
    return {k: join_tensors(v, tensors) for k, v in data.items()}


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)


def save_checkpoint(out_dir: str | Path, step: int, weights: dict[str, torch.Tensor],
                    best: dict[str, torch.Tensor] | None, trainer_state: dict[str, Any],
                    state: dict[str, Any]) -> Path:
    """Write checkpoint ``step`` durably, point ``LATEST`` at it, then delete the older ones.

    Storage errors propagate as ``OSError`` after the temporary folder is removed; ``LATEST`` and the checkpoint
    it names are untouched (the caller says so to the user). The caller holds the run folder's lock, so leftovers
    of killed writers can be cleared here.
    """
    root = Path(out_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*"):  # temp folders of writers killed mid-checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    tensors: dict[str, torch.Tensor] = {}
    structure = split_tensors(trainer_state, tensors)
    with durable_folder(final) as tmp:
        _save_tensors(weights, tmp / "weights.safetensors")
        if best is not None:
            _save_tensors(best, tmp / "best.safetensors")
        save_tensors(tensors, tmp / "trainer.safetensors")
        (tmp / "trainer.json").write_text(json.dumps(structure, indent=1))
        (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))  # last: marks the folder done
    write_bytes_durably(root / "LATEST", (final.name + "\n").encode())
    for old in root.glob("step-*"):
        if old.is_dir() and old != final:
            shutil.rmtree(old, ignore_errors=True)
    remove_leftovers(root, "LATEST")
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
    """(weights, best weights or None, trainer state, state) from a checkpoint folder.

    Raises:
        OldCheckpointError: the folder holds a pickled ``trainer.pt`` of an older peftlab.
    """
    if not (folder / "trainer.json").exists() and (folder / "trainer.pt").exists():
        raise OldCheckpointError(
            f"{folder} was written by an older peftlab (trainer.pt, a pickle, which is never loaded); restart the "
            f"run in a new out folder (or delete {folder.parent} to restart this one)")
    weights = load_file(folder / "weights.safetensors")
    best_path = folder / "best.safetensors"
    best = load_file(best_path) if best_path.exists() else None
    trainer_state = join_tensors(json.loads((folder / "trainer.json").read_text()),
                                 load_file(folder / "trainer.safetensors"))
    state = json.loads((folder / "state.json").read_text())
    return weights, best, trainer_state, state
