"""PEFT methods: one sub-package each, registered on import. See :mod:`peftlab.methods.base` for the contract."""

from peftlab.methods.base import MethodSpec, PeftMethod, all_methods, freeze_all, get_method, register

# Importing a method package registers it.
from peftlab.methods import (  # noqa: E402,F401  isort: skip
    adapters,
    bitfit,
    full,
    ia3,
    intrinsic_dim,
    last_blocks,
    last_layer,
    lora,
    prefix_tuning,
    prompt_tuning,
)

__all__ = ["MethodSpec", "PeftMethod", "all_methods", "freeze_all", "get_method", "register"]
