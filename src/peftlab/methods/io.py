"""Saving and loading adapters: the trainable weights only, as safetensors, plus a JSON config. No pickle.

Folder layout::

    adapter/
      adapter_config.json       {"format": "peftlab-adapter", "method": ..., "method_config": {...},
                                 "base_model": ..., "base_fingerprint": {...}, "task": {...}, "peftlab_version": ...}
      adapter.safetensors       name -> tensor, names from ``PeftMethod.trainable_parameters()``

Loading checks the base model's architecture fingerprint against the one recorded, and refuses a mismatch with a
message naming each differing field, before any weight is touched.

This module knows only peftlab's own format. :mod:`peftlab.interop.adapter_files` is the one place that picks the
format of a folder (peftlab's, or Hugging Face PEFT's through :mod:`peftlab.interop.import_peft`) and loads it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from torch import nn

import peftlab
from peftlab.config import ConfigError, config_from_dict
from peftlab.durable import disk_errors, durable_folder, save_tensors
from peftlab.methods.base import PeftMethod, get_method
from peftlab.methods.tensor_file import TensorFileError, byte_budget, load_adapter_tensors, read_header
from peftlab.models.arch import arch_fingerprint

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT = "peftlab-adapter"


class AdapterMismatchError(ValueError):
    """The adapter was trained on a different base model (the message lists the differing fields)."""


def save_adapter(method: PeftMethod, method_name: str, folder: str | Path, base_model: str,
                 base_fingerprint: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write ``folder`` atomically and durably (:func:`peftlab.durable.durable_folder`). Returns the folder.

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
    with disk_errors(folder, "no adapter was written (an earlier one, if any, is intact)"), \
            durable_folder(folder) as tmp:
        save_tensors(method.adapter_state_dict(), tmp / WEIGHTS_NAME, metadata={"format": FORMAT})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str) + "\n")
    return folder


# Keys every peftlab adapter_config.json has, with their JSON type (checked on reading: the file may be edited).
REQUIRED_KEYS: dict[str, type] = {"method": str, "method_config": dict, "base_model": str, "base_fingerprint": dict}


def read_peftlab_config(folder: str | Path) -> dict[str, Any]:
    """The adapter's JSON config, checked without loading any model: the config (method, options, task) and the
    structure of the weight file's header, so a damaged adapter is refused before the base model loads.

    Raises:
        FileNotFoundError: no such folder, or no config or weight file in it.
        ValueError: invalid JSON, a foreign format, a missing or wrong-typed key, an unknown method or invalid
            option (the file and key are named), or a damaged weight file (:class:`TensorFileError`).
    """
    folder = Path(folder)
    config = _read_config_file(folder)
    read_header(folder / WEIGHTS_NAME)
    return config


def _read_config_file(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder}: " + ("is a file, not a folder" if folder.exists()
                                                                else "no such folder"))
    if not path.exists():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME} here; expected a folder written by peftlab train "
                                f"(<out>/adapter)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path}: not a peftlab adapter (format={found!r}, expected {FORMAT!r})")
    for key, kind in REQUIRED_KEYS.items():
        if not isinstance(config.get(key), kind):
            raise TensorFileError(f"{path}: key {key!r} must be a JSON {'string' if kind is str else 'object'}, "
                                  f"got {config.get(key)!r}")
    try:
        get_method(config["method"]).build_config(config["method_config"])
        if "task" in config:
            config_from_dict({"task": config["task"]})
    except ConfigError as exc:
        raise TensorFileError(f"{path}: {exc}") from None
    return config


def check_base(config: dict[str, Any], model: nn.Module, folder: str | Path) -> None:
    """Raise ``AdapterMismatchError`` when ``model`` differs from the base the adapter was trained on."""
    expected, actual = config["base_fingerprint"], arch_fingerprint(model)
    diffs = [f"{k}: adapter {expected.get(k)!r} vs model {actual.get(k)!r}"
             for k in sorted(set(expected) | set(actual)) if expected.get(k) != actual.get(k)]
    if diffs:
        raise AdapterMismatchError(
            f"adapter {folder} was trained on {config['base_model']!r}, which differs from this base model: "
            + "; ".join(diffs))


def load_peftlab_adapter(model: nn.Module, folder: str | Path) -> tuple[PeftMethod, dict[str, Any]]:
    """Apply the saved method to ``model`` (checked against the recorded base) and load its weights."""
    folder = Path(folder)
    config = read_peftlab_config(folder)
    check_base(config, model, folder)
    spec = get_method(config["method"])
    method = spec.apply(model, spec.build_config(config["method_config"]))
    path = folder / WEIGHTS_NAME
    # Dtypes and the byte total are checked against what this method can hold before any tensor is allocated (the
    # saved layout may differ from the trainable one: folded prefix tuning), then names and shapes by the method.
    budget = byte_budget({**method.trainable_parameters(), **method.adapter_state_dict()})
    state, _ = load_adapter_tensors(path, budget)
    try:
        method.load_adapter_state_dict(state)
    except ValueError as exc:
        raise TensorFileError(f"{path}: {exc}") from None
    return method, config

