"""The one place that picks an adapter folder's format: peftlab's own (:mod:`peftlab.methods.io`) or Hugging Face
PEFT's (``adapter_config.json`` with a ``peft_type``; :mod:`peftlab.interop.import_peft`, converted in memory and
checked by tensor shapes instead of a fingerprint). Both formats sit below this module and never import each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from peftlab.interop.import_peft import load_peft_adapter, peft_adapter_config
from peftlab.interop.peft_format import is_peft_folder, peft_weights_path
from peftlab.methods.base import PeftMethod
from peftlab.methods.io import load_peftlab_adapter, read_peftlab_config
from peftlab.methods.tensor_file import read_header


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """The adapter's config (method, options, base model, ...) without loading any model; the weight file's header
    is checked too, so a damaged adapter is refused before the base model loads.

    Raises:
        FileNotFoundError: no such folder, or no config or weight file in it.
        ValueError: a foreign format, an unknown method or invalid option (named), or a damaged weight file.
    """
    folder = Path(folder)
    if is_peft_folder(folder):
        config = peft_adapter_config(folder)
        read_header(peft_weights_path(folder))
        return config
    return read_peftlab_config(folder)


def load_adapter(model: nn.Module, folder: str | Path) -> tuple[PeftMethod, dict[str, Any]]:
    """Apply the folder's method to ``model`` and load its weights (either format); returns the method and config."""
    folder = Path(folder)
    if is_peft_folder(folder):
        return load_peft_adapter(model, folder)
    return load_peftlab_adapter(model, folder)
