"""PEFT methods: one sub-package each, registered on import. See :mod:`peftlab.methods.base` for the contract."""

from peftlab.methods.base import MethodSpec, PeftMethod, all_methods, freeze_all, get_method, register

# Importing a method package registers it.
from peftlab.methods import adapters, bitfit, full, ia3, last_blocks, last_layer, lora, prompt_tuning  # noqa: E402,F401  isort: skip

__all__ = ["MethodSpec", "PeftMethod", "all_methods", "freeze_all", "get_method", "register"]
