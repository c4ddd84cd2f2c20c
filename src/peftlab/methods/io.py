"""Saving and loading adapters: the trainable weights only, as safetensors, plus a JSON config. No pickle.

Folder layout::

    adapter/
      adapter_config.json       {"format": "peftlab-adapter", "method": ..., "method_config": {...},
                                 "base_model": ..., "base_fingerprint": {...}, "task": {...}, "peftlab_version": ...}
      adapter.safetensors       name -> tensor, names from ``PeftMethod.trainable_parameters()``

Loading checks the base model's architecture fingerprint against the one recorded, and refuses a mismatch with a
message naming each differing field, before any weight is touched.

A Hugging Face PEFT adapter folder (``adapter_config.json`` with a ``peft_type`` + ``adapter_model.safetensors``)
is read too: :func:`read_adapter_config` and :func:`load_adapter` convert it in memory (LoRA, IA3, prompt and
prefix tuning; see :mod:`peftlab.interop.import_peft`), checking tensor shapes instead of a fingerprint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

import peftlab
from peftlab.methods.base import PeftMethod, get_method
from peftlab.models.arch import arch_fingerprint

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT = "peftlab-adapter"


class AdapterMismatchError(ValueError):
    """The adapter was trained on a different base model (the message lists the differing fields)."""


def save_adapter(method: PeftMethod, method_name: str, folder: str | Path, base_model: str,
                 base_fingerprint: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write ``folder`` atomically (a temporary sibling folder, then a rename). Returns the folder.

    ``base_fingerprint`` is ``arch_fingerprint(model)`` taken before the method was applied (a method such as
    last-layer may untie the head, which changes the fingerprint of the modified model).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "method": method_name,
        "method_config": dataclasses.asdict(method.config),
        "base_model": base_model,
        "base_fingerprint": base_fingerprint,
        "method_info": method.describe(),
        "peftlab_version": peftlab.__version__,
        **(extra or {}),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(method.adapter_state_dict(), tmp / WEIGHTS_NAME, metadata={"format": FORMAT})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str) + "\n")
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """The adapter's JSON config; a missing or foreign folder raises ``FileNotFoundError``/``ValueError``."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if _is_peft_folder(folder):
        from peftlab.interop.import_peft import peft_adapter_config  # interop builds on this module: import late

        return peft_adapter_config(folder)
    if not path.exists():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME} here; expected a folder written by peftlab train "
                                f"(<out>/adapter)")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: not a peftlab adapter (format={config.get('format')!r})")
    return config


def _is_peft_folder(folder: Path) -> bool:
    from peftlab.interop.peft_format import is_peft_folder  # interop builds on this module: import late

    return is_peft_folder(folder)


def check_base(config: dict[str, Any], model: nn.Module, folder: str | Path) -> None:
    """Raise ``AdapterMismatchError`` when ``model`` differs from the base the adapter was trained on."""
    expected, actual = config["base_fingerprint"], arch_fingerprint(model)
    diffs = [f"{k}: adapter {expected.get(k)!r} vs model {actual.get(k)!r}"
             for k in sorted(set(expected) | set(actual)) if expected.get(k) != actual.get(k)]
    if diffs:
        raise AdapterMismatchError(
            f"adapter {folder} was trained on {config['base_model']!r}, which differs from this base model: "
            + "; ".join(diffs))


def load_adapter(model: nn.Module, folder: str | Path) -> tuple[PeftMethod, dict[str, Any]]:
    """Apply the saved method to ``model`` (checked against the recorded base) and load its weights.

    A PEFT adapter folder is converted in memory; its tensor shapes are checked against ``model`` instead.
    """
    folder = Path(folder)
    if _is_peft_folder(folder):
        from peftlab.interop.import_peft import load_peft_adapter  # interop builds on this module: import late

        return load_peft_adapter(model, folder)
    config = read_adapter_config(folder)
    check_base(config, model, folder)
    spec = get_method(config["method"])
    method = spec.apply(model, spec.build_config(config["method_config"]))
    method.load_adapter_state_dict(load_file(folder / WEIGHTS_NAME))
    return method, config
