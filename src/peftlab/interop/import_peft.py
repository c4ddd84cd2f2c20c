"""Read a Hugging Face PEFT adapter folder as a peftlab adapter, generic over the methods' converters.

The folder's ``peft_type`` picks the registered method whose converter (``MethodSpec.peft``, in the method's own
``peft.py``) reads it; the converter maps PEFT's options to the method's, may rewrite them with the model at hand
and convert the tensors (PEFT's ``base_model.model.`` key prefix is dropped here). An option that changes what the
adapter computes and that the converter does not map is refused with its key; options the converter lists as
ignored only matter to PEFT's own initialisation or bookkeeping. A PEFT folder has no peftlab fingerprint: the
base model is checked through the dimensions the converter names and the shape of every tensor.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.config import ConfigError, ModelConfig
from peftlab.interop.peft_format import (
    PEFT_CONFIG_NAME,
    PEFT_FORMAT,
    PEFT_WEIGHTS_NAME,
    PeftConverter,
    PeftFormatError,
    ensure_free,
    read_peft_config,
    read_peft_weights,
    spec_for_peft_type,
)
from peftlab.methods.base import PeftMethod
from peftlab.methods.io import AdapterMismatchError, save_adapter
from peftlab.methods.tensor_file import byte_budget
from peftlab.models.arch import arch_fingerprint
from peftlab.models.loading import load_model_and_tokenizer
from peftlab.registry import MethodSpec, get_method

# Keys every PEFT config has that describe the file, not the adapter's computation.
COMMON_IGNORED = frozenset({"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                            "auto_mapping", "peft_version"})


def _is_unset(value: Any) -> bool:
    return value is None or value is False or value in ("", "none") or (isinstance(value, (list, dict)) and not value)


def _check_keys(spec: MethodSpec, config: dict[str, Any], where: Path) -> None:
    """Refuse options peftlab cannot honour, naming the key (task types other than a causal LM too)."""
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise PeftFormatError(f"{where}: task_type={config['task_type']!r} is not supported; peftlab adapts causal "
                              f"language models (task_type CAUSAL_LM or null)")
    found = spec.peft
    known = COMMON_IGNORED | found.mapped | found.ignored
    for key, value in config.items():
        if key not in known and not _is_unset(value):
            raise PeftFormatError(
                f"{where}: PEFT option {key}={value!r} is not supported by peftlab's "
                f"{spec.name}; supported options: {', '.join(sorted(found.mapped))} (others must be unset)")


def peft_method_config(config: dict[str, Any], where: str | Path = PEFT_CONFIG_NAME) -> tuple[str, dict[str, Any]]:
    """peftlab's method name and options for a PEFT ``adapter_config.json`` (no model needed).

    Raises:
        PeftFormatError: an unknown ``peft_type``, an unsupported option (named), or an invalid value.
    """
    where = Path(where)
    spec = spec_for_peft_type(str(config.get("peft_type")), where)
    if config.get("num_transformer_submodules") not in (None, 1):
        raise PeftFormatError(f"{where}: num_transformer_submodules={config['num_transformer_submodules']} is an "
                              f"encoder-decoder prompt; peftlab adapts decoder-only models (1)")
    _check_keys(spec, config, where)
    options = spec.peft.import_options(config, where)
    try:
        spec.build_config(options)  # peftlab's own checks (r > 0, ...), reported with the file
    except ConfigError as exc:
        raise PeftFormatError(f"{where}: {exc}") from exc
    return spec.name, options


def peft_adapter_config(folder: str | Path) -> dict[str, Any]:
    """What :func:`peftlab.interop.adapter_files.read_adapter_config` returns for a PEFT folder (no model needed).

    Keys: ``format`` ("peft"), ``method``, ``method_config``, ``base_model`` (PEFT's ``base_model_name_or_path``,
    may be None), ``base_fingerprint`` (None: PEFT records none) and ``peft_config`` (the file as read).
    """
    folder = Path(folder)
    config = read_peft_config(folder)
    method, options = peft_method_config(config, folder / PEFT_CONFIG_NAME)
    return {"format": PEFT_FORMAT, "method": method, "method_config": options,
            "base_model": config.get("base_model_name_or_path"), "base_fingerprint": None, "peft_config": config}


def _check_dimensions(model: nn.Module, found: PeftConverter, config: dict[str, Any], where: Path) -> None:
    """The model dimensions the converter names against PEFT's recorded ones, each mismatch named."""
    diffs = [f"{key}: adapter {config.get(key)!r} vs model {value!r}" for key, value in found.dimensions(model).items()
             if config.get(key) is not None and config[key] != value]
    if diffs:
        raise AdapterMismatchError(f"PEFT adapter {where} was made for {config.get('base_model_name_or_path')!r}, "
                                   f"which differs from this base model: " + "; ".join(diffs))


def check_weights(method: PeftMethod, state: dict[str, torch.Tensor], where: Path, made_for: str | None) -> None:
    """Every tensor of the file against the applied method's parameters: missing, extra and mis-shaped keys named.

    Raises:
        AdapterMismatchError: the adapter does not fit (typically: made for another base model).
    """
    expected = {k: tuple(p.shape) for k, p in method.trainable_parameters().items()}
    # Frozen tensors the method saves besides its trainable ones (VeRA's shared projections) may be in the file.
    optional = {k: tuple(v.shape) for k, v in method.adapter_state_dict().items() if k not in expected}
    known = {**optional, **expected}
    got = {k: tuple(v.shape) for k, v in state.items()}
    problems = []
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(known))
    shapes = [f"{k}: file {got[k]} vs model {known[k]}" for k in sorted(set(got) & set(known)) if got[k] != known[k]]
    if missing:
        problems.append(f"{len(missing)} weight(s) the model needs are not in {PEFT_WEIGHTS_NAME}, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} weight(s) in {PEFT_WEIGHTS_NAME} fit no adapted layer, e.g. {extra[:3]}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes[:3]))
    if problems:
        model_type = getattr(method.model.config, "model_type", "?")
        raise AdapterMismatchError(f"PEFT adapter {where} (made for {made_for!r}) does not fit this {model_type} "
                                   f"base model: " + "; ".join(problems))


def load_peft_adapter(model: nn.Module, folder: str | Path) -> tuple[PeftMethod, dict[str, Any]]:
    """Apply the PEFT folder's method to ``model`` and load its weights (the PEFT branch of ``load_adapter``).

    Returns:
        The method and the adapter config (as :func:`peft_adapter_config`, with the options actually applied).

    Raises:
        PeftFormatError: an unsupported PEFT type or option (named), or no safetensors file.
        AdapterMismatchError: the adapter was made for a base model of other dimensions (each difference named).
    """
    folder = Path(folder)
    record = peft_adapter_config(folder)
    method_name, options = record["method"], record["method_config"]
    made_for = record["base_model"]
    spec = get_method(method_name)
    _check_dimensions(model, spec.peft, record["peft_config"], folder / PEFT_CONFIG_NAME)
    try:
        options = spec.peft.fit_options(model, options)
        method = spec.apply(model, spec.build_config(options))
    except ConfigError as exc:
        raise AdapterMismatchError(f"PEFT adapter {folder} (made for {made_for!r}) does not fit this base model: "
                                   f"{exc}") from exc
    # The header is checked against what the applied method can hold before any tensor is read.
    state, _ = read_peft_weights(folder, byte_budget({**method.trainable_parameters(), **method.adapter_state_dict()}))
    state = spec.peft.convert_state(record["peft_config"], state, folder / PEFT_CONFIG_NAME)
    check_weights(method, state, folder, made_for)
    method.load_adapter_state_dict(state)
    return method, {**record, "method_config": dataclasses.asdict(method.config)}


def import_adapter(peft_dir: str | Path, out: str | Path, model_name: str | None = None) -> Path:
    """``peftlab import PEFT_DIR OUT``: convert a PEFT adapter folder into a peftlab adapter folder.

    The base model is loaded (``model_name``, default PEFT's ``base_model_name_or_path``) so the result records
    its fingerprint, like an adapter peftlab trained.

    Raises:
        PeftFormatError: no base model is known, or the folder cannot be converted (the key is named).
        AdapterMismatchError: the adapter does not fit the base model.
        OutputExistsError: ``out`` is not empty.
    """
    peft_dir = Path(peft_dir)
    out = ensure_free(out)
    record = peft_adapter_config(peft_dir)
    name = model_name or record["base_model"]
    if not name:
        raise PeftFormatError(f"{peft_dir / PEFT_CONFIG_NAME}: base_model_name_or_path is empty; pass the base model "
                              f"with --model (a hub id, a local folder, a .gguf file or smollm2-135m)")
    model, _ = load_model_and_tokenizer(ModelConfig(name=name))
    fingerprint = arch_fingerprint(model)
    method, config = load_peft_adapter(model, peft_dir)
    extra = {"imported_from": {"path": str(peft_dir.resolve()), "peft_config": config["peft_config"]}}
    return save_adapter(method, config["method"], out, name, fingerprint, extra=extra)
