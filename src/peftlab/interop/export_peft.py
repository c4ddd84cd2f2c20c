"""Export a peftlab adapter as a Hugging Face PEFT adapter folder that ``PeftModel.from_pretrained`` loads.

Generic over the methods' converters: each method folder's ``peft.py`` (``MethodSpec.peft``, a
:class:`peftlab.interop.peft_format.PeftConverter`) gives PEFT's options and tensors (keys relative to the base
model; layer methods add PEFT's ``base_model.model.`` prefix); a method without one is refused with the reason its
spec gives (``MethodSpec.no_peft``). This module adds the keys every PEFT config has and writes the folder.

The safetensors metadata records the peftlab adapter the export came from (``peftlab_export``), which lets
:mod:`peftlab.interop.import_peft` restore GPT-2 slices exactly; PEFT ignores it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import peftlab
from peftlab.config import ModelConfig
from peftlab.durable import save_tensors
from peftlab.interop.adapter_files import load_adapter, read_adapter_config
from peftlab.interop.peft_format import (
    EXPORT_METADATA_KEY,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    Exported,
    PeftConverter,
    PeftFormatError,
    atomic_folder,
    converter,
    ensure_free,
    exportable_methods,
    is_peft_folder,
)
from peftlab.methods.base import PeftMethod
from peftlab.models.loading import load_model_and_tokenizer, pretrained_source
from peftlab.registry import get_method


def check_exportable(method_name: str, where: str | Path = "") -> PeftConverter:
    """The method's PEFT converter; :class:`PeftFormatError` naming ``method_name``, the reason it has none and the
    exportable methods when it has none."""
    found = converter(method_name)
    if found is None:
        raise PeftFormatError(
            f"{where}: method {method_name!r} has no Hugging Face PEFT equivalent that peftlab can export "
            f"({get_method(method_name).no_peft}); exportable methods: {', '.join(exportable_methods())}")
    return found


def peft_export(method: PeftMethod, method_name: str, base_model_name_or_path: str | None = None) -> Exported:
    """PEFT's ``adapter_config.json`` contents and ``adapter_model.safetensors`` tensors for an applied method.

    Args:
        method: the method applied to its base model (the weights as trained).
        method_name: its registered name.
        base_model_name_or_path: recorded as PEFT's ``base_model_name_or_path``.

    Returns:
        The config dict and the tensors (CPU, contiguous, keys with PEFT's prefix where PEFT has one).

    Raises:
        PeftFormatError: the method cannot be exported (the message lists the ones that can).
    """
    found = check_exportable(method_name)
    options, state = found.export(method, base_model_name_or_path)
    config = {"peft_type": found.peft_type, "task_type": "CAUSAL_LM",
              "base_model_name_or_path": base_model_name_or_path, "revision": None, "inference_mode": True,
              "auto_mapping": None, "modules_to_save": None, **options}
    return config, {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_peft_adapter(method: PeftMethod, method_name: str, out: str | Path,
                      base_model_name_or_path: str | None = None, base_model: str | None = None) -> Path:
    """Write ``out`` (atomically; an existing non-empty folder is refused) as a PEFT adapter folder.

    Args:
        method: the applied method.
        method_name: its registered name.
        out: the folder to create.
        base_model_name_or_path: PEFT's ``base_model_name_or_path`` (something ``from_pretrained`` can load).
        base_model: peftlab's ``model.name`` of the base, recorded in the file's metadata.
    """
    config, state = peft_export(method, method_name, base_model_name_or_path)
    record = {"method": method_name, "method_config": dataclasses.asdict(method.config), "base_model": base_model,
              "peftlab_version": peftlab.__version__}
    metadata = {"format": "pt", EXPORT_METADATA_KEY: json.dumps(record, default=str)}
    with atomic_folder(out) as tmp:
        save_tensors(state, tmp / PEFT_WEIGHTS_NAME, metadata=metadata)
        (tmp / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out)


def export_adapter(adapter: str | Path, out: str | Path, model_name: str | None = None) -> Path:
    """``peftlab export --adapter DIR --to peft OUT``: load the base and the adapter, write a PEFT folder.

    Args:
        adapter: a peftlab adapter folder (``adapter.safetensors`` + ``adapter_config.json``).
        out: the PEFT folder to create; must not exist or be empty.
        model_name: the base model (``model.name`` syntax); default: the one the adapter records.

    Raises:
        PeftFormatError: the method cannot be exported, or ``adapter`` is already a PEFT folder.
        OutputExistsError: ``out`` is not empty.
    """
    adapter = Path(adapter)
    ensure_free(out)
    if is_peft_folder(adapter):
        raise PeftFormatError(f"{adapter} is already a Hugging Face PEFT adapter folder; nothing to export")
    config = read_adapter_config(adapter)
    check_exportable(config["method"], adapter / "adapter_config.json")
    name = model_name or config["base_model"]
    model, _ = load_model_and_tokenizer(ModelConfig(name=name))
    method, _ = load_adapter(model, adapter)
    return save_peft_adapter(method, config["method"], out, pretrained_source(name), base_model=name)
