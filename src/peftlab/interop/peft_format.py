"""What peftlab knows about Hugging Face PEFT's adapter folder (peft 0.21), shared by export, import, merge and the
methods' own converters (:class:`PeftConverter`, one per method folder, ``methods/<name>/peft.py``).

A PEFT adapter folder (``PeftModel.save_pretrained``)::

    adapter_config.json           {"peft_type": "LORA" | "IA3" | "PROMPT_TUNING" | "PREFIX_TUNING", ...options}
    adapter_model.safetensors     keys "base_model.model.<module>.lora_A.weight", ... (layer methods) or
                                  "prompt_embeddings" (prompt learning); no adapter name in the keys

Our adapter folder (:mod:`peftlab.methods.io`) differs only in the file names, in the keys (no
``base_model.model.`` prefix) and in its config. PEFT is not imported here: it is a test-only dependency, so the
JSON is written and read by hand, key by key as peft 0.21.2 writes it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.durable import durable_folder
from peftlab.methods.tensor_file import load_adapter_tensors
from peftlab.models.arch import transformer_blocks
from peftlab.registry import MethodSpec, all_methods, get_method

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PICKLE_NAME = "adapter_model.bin"
# PEFT prefixes the keys of layer methods with the PeftModel -> LoraModel -> base model path.
PEFT_KEY_PREFIX = "base_model.model."
# Safetensors metadata key under which an export records the peftlab adapter it came from (PEFT ignores metadata).
EXPORT_METADATA_KEY = "peftlab_export"
PEFT_FORMAT = "peft"  # the "format" of the config dict that read_adapter_config returns for a PEFT folder

class PeftFormatError(ValueError):
    """A PEFT folder or option that peftlab cannot convert; the message names the file and key."""


# A converter's export: PEFT's adapter_config.json options (peft_type and the common keys are added by the caller)
# and the tensors under PEFT's keys.
Exported = tuple[dict[str, Any], dict[str, torch.Tensor]]


class PeftConverter:
    """How one method maps to and from a Hugging Face PEFT adapter; a method folder's ``peft.py`` subclasses it and
    its spec holds an instance (``MethodSpec.peft``). :mod:`peftlab.interop` calls only these hooks.

    Attributes:
        peft_type: PEFT's ``peft_type`` (``"LORA"``, ...).
        mapped: PEFT options the converter maps to the method's options or checks against the model.
        ignored: PEFT options that only steer PEFT's own initialisation or bookkeeping. Any other option must be
            unset (None, False, empty, "none"), or the import is refused naming it.
    """

    peft_type: str = ""
    mapped: frozenset[str] = frozenset()
    ignored: frozenset[str] = frozenset()

    def export(self, method: Any, base: str | None) -> Exported:
        """PEFT's options and tensors for the applied ``method`` (``base``: PEFT's ``base_model_name_or_path``)."""
        raise NotImplementedError

    def import_options(self, config: dict[str, Any], where: Path) -> dict[str, Any]:
        """The method's options for a PEFT ``adapter_config.json`` (no model needed); ``PeftFormatError`` names the
        key it cannot convert."""
        raise NotImplementedError

    def dimensions(self, model: nn.Module) -> dict[str, int]:
        """PEFT config keys that must equal these model dimensions (checked before the method is applied)."""
        return {}

    def fit_options(self, model: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
        """The imported options rewritten with the model at hand (e.g. PEFT name rules resolved to ours)."""
        return options

    def convert_state(self, config: dict[str, Any], state: dict[str, torch.Tensor],
                      where: Path) -> dict[str, torch.Tensor]:
        """PEFT's tensors (prefix removed) as the method's ``load_adapter_state_dict`` takes them."""
        return state


def converter(method_name: str) -> PeftConverter | None:
    """The PEFT converter of a registered method, or None."""
    return get_method(method_name).peft


def exportable_methods() -> list[str]:
    """Names of the methods that have a PEFT converter."""
    return [spec.name for spec in all_methods() if spec.peft is not None]


def spec_for_peft_type(peft_type: str, where: str | Path) -> MethodSpec:
    """The registered method whose converter reads ``peft_type``.

    Raises:
        PeftFormatError: no method does (the message lists the importable PEFT types).
    """
    specs = {spec.peft.peft_type: spec for spec in all_methods() if spec.peft is not None}
    if peft_type not in specs:
        raise PeftFormatError(f"{where}: peft_type={peft_type!r} cannot be imported; importable PEFT types: "
                              f"{', '.join(sorted(specs))} (peftlab methods "
                              f"{', '.join(specs[t].name for t in sorted(specs))})")
    return specs[peft_type]


def required(config: dict[str, Any], key: str, where: Path) -> Any:
    """``config[key]``; ``PeftFormatError`` when it is missing or null."""
    if config.get(key) is None:
        raise PeftFormatError(f"{where}: PEFT option {key!r} is missing or null")
    return config[key]


def require_linear_layers(layers: dict[str, nn.Module], peft_type: str) -> None:
    """Refuse an export to a PEFT type that wraps only ``nn.Linear`` (LoHa, LoKr, OFT in peft 0.21.2) when a layer
    is a GPT-2 ``Conv1D`` (``fan_in_fan_out``) or a slice of one: PEFT would raise on loading it.

    Raises:
        PeftFormatError: naming the first such layer.
    """
    for name, layer in layers.items():
        if getattr(layer, "fan_in_fan_out", False) or not getattr(layer, "whole", True):
            raise PeftFormatError(f"{name}: PEFT's {peft_type} wraps torch.nn.Linear layers only, not GPT-2's Conv1D "
                                  f"(peft 0.21.2 raises on it); this adapter cannot be exported to PEFT")


def base_module_names(model: nn.Module, wrappers: dict[str, nn.Module]) -> list[str]:
    """Module paths of the base model: the model's, without what lives inside the method's wrapper layers."""
    names = []
    for name, _ in model.named_modules():
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        inside = False
        while parent:
            if parent in wrappers:
                inside = True
                break
            parent = parent.rsplit(".", 1)[0] if "." in parent else ""
        if name and not inside:
            names.append(name)
    return names


def peft_target_modules(model: nn.Module, layers: dict[str, nn.Module]) -> list[str]:
    """The fewest ``target_modules`` names with which PEFT wraps exactly the method's wrapped ``layers`` of
    ``model`` (PEFT's list rule, over the base model's modules)."""
    return minimal_names(list(layers), base_module_names(model, layers), peft_list_match)


def prompt_learning_shape(model: nn.Module) -> dict[str, int]:
    """The model dimensions a PEFT prompt-learning config records (decoder-only: one transformer sub-module)."""
    return {"num_transformer_submodules": 1, "num_layers": len(transformer_blocks(model)),
            "num_attention_heads": int(model.config.num_attention_heads)}


class OutputExistsError(FileExistsError, ValueError):
    """The output folder exists and is not empty (a ValueError too, so the CLI reports it as a usage error)."""


def is_peft_folder(folder: str | Path) -> bool:
    """True when ``folder`` holds a PEFT ``adapter_config.json`` (one with a ``peft_type``)."""
    path = Path(folder) / PEFT_CONFIG_NAME
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "peft_type" in config and "format" not in config


def read_peft_config(folder: str | Path) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` as a dict.

    Raises:
        FileNotFoundError: there is no ``adapter_config.json``.
        PeftFormatError: the file is not JSON or has no ``peft_type``.
    """
    path = Path(folder) / PEFT_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {PEFT_CONFIG_NAME} here; expected a PEFT adapter folder "
                                "(PeftModel.save_pretrained)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise PeftFormatError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or "peft_type" not in config:
        raise PeftFormatError(f"{path}: not a PEFT adapter config (no 'peft_type' key)")
    return config


def peft_weights_path(folder: str | Path) -> Path:
    """The folder's ``adapter_model.safetensors``.

    Raises:
        PeftFormatError: only the pickled ``adapter_model.bin`` is there (peftlab never unpickles), or nothing is.
    """
    folder = Path(folder)
    path = folder / PEFT_WEIGHTS_NAME
    if not path.is_file():
        if (folder / PEFT_PICKLE_NAME).is_file():
            raise PeftFormatError(
                f"{folder}: holds {PEFT_PICKLE_NAME} (a pickle) but no {PEFT_WEIGHTS_NAME}; peftlab reads safetensors "
                f"only: re-save it with PEFT's save_pretrained(..., safe_serialization=True)")
        raise PeftFormatError(f"{folder}: no {PEFT_WEIGHTS_NAME} next to {PEFT_CONFIG_NAME}")
    return path


def read_peft_weights(folder: str | Path, max_bytes: int | None = None) -> tuple[dict[str, torch.Tensor],
                                                                                  dict[str, str]]:
    """The adapter tensors with PEFT's ``base_model.model.`` prefix removed, and the file's metadata.

    Args:
        folder: the PEFT adapter folder.
        max_bytes: refuse a file declaring more tensor bytes (checked on the header, before reading).

    Raises:
        PeftFormatError: no safetensors file (see :func:`peft_weights_path`).
        TensorFileError: a damaged file, non-float tensors or more than ``max_bytes``.
    """
    state, metadata = load_adapter_tensors(peft_weights_path(folder), max_bytes=max_bytes)
    return {key.removeprefix(PEFT_KEY_PREFIX): value for key, value in state.items()}, metadata


def peft_list_match(module: str, item: str) -> bool:
    """PEFT's (and peftlab's) rule for one item of a ``target_modules`` list: the name or a dotted suffix of it."""
    return module == item or module.endswith("." + item)


def peft_suffix_match(module: str, item: str) -> bool:
    """PEFT's rule for an item of IA3's ``feedforward_modules`` list: a plain string suffix (no dot needed)."""
    return module.endswith(item)


def minimal_names(chosen: list[str], universe: Iterable[str], matches: Callable[[str, str], bool]) -> list[str]:
    """Short names that select exactly ``chosen`` among ``universe`` under ``matches``.

    For each chosen module the shortest dotted suffix (``q_proj``, then ``self_attn.q_proj``, ... up to the full
    path) that matches no module outside ``chosen``; so GPT-2's ``mlp.c_proj`` stays ``mlp.c_proj`` when
    ``attn.c_proj`` is not chosen.

    Args:
        chosen: module paths, in the order the names should follow.
        universe: every module path a name could match.
        matches: ``matches(module, name)`` is the selection rule (:func:`peft_list_match` or
            :func:`peft_suffix_match`).

    Returns:
        Distinct names, in the order of ``chosen``.
    """
    wanted = set(chosen)
    others = [m for m in universe if m not in wanted]
    names: list[str] = []
    for module in chosen:
        parts = module.split(".")
        name = module
        for k in range(1, len(parts) + 1):
            candidate = ".".join(parts[-k:])
            if not any(matches(other, candidate) for other in others):
                name = candidate
                break
        if name not in names:
            names.append(name)
    return names


def ensure_free(out: str | Path) -> Path:
    """``out`` as a Path, refusing an existing non-empty folder (or a file) so that nothing is overwritten.

    Raises:
        OutputExistsError: ``out`` is a file or a non-empty folder.
    """
    out = Path(out)
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise OutputExistsError(f"{out} already exists and is not empty; choose another output folder "
                              f"(peftlab never overwrites one)")
    return out


@contextlib.contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``out``; on success it is renamed to ``out``, on error removed.

    A crash therefore never leaves a half-written ``out``. An existing empty ``out`` is replaced.

    Raises:
        OutputExistsError: ``out`` exists and is not empty (checked before and again at the rename).
    """
    out = ensure_free(out)
    # The durable folder protocol (peftlab.durable): files and folder fsynced, renamed, parent fsynced.
    with durable_folder(out, replace=False) as tmp:
        yield tmp
        ensure_free(out)  # again just before the rename: another process may have written there meanwhile
