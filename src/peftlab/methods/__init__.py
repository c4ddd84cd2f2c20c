"""PEFT methods: one sub-package each, found by :func:`discover` and registered on import.

See :mod:`peftlab.methods.base` for the contract and CONTRIBUTING.md for adding a method. Importing this package
imports no method: the registry (:mod:`peftlab.registry`) calls :func:`discover` on its first lookup, so the
folders' own modules (and :mod:`peftlab.interop.peft_format`, which their PEFT converters use) may import
``peftlab.methods.*`` helpers without a cycle.
"""

import importlib
import pkgutil

from peftlab.methods.base import MethodSpec, PeftMethod, all_methods, freeze_all, get_method, register


def discover() -> list[str]:
    """Import every sub-package of this package (each registers its methods); returns their module names."""
    names = [info.name for info in pkgutil.iter_modules(__path__, prefix=f"{__name__}.") if info.ispkg]
    for name in names:
        importlib.import_module(name)
    return names


__all__ = ["MethodSpec", "PeftMethod", "all_methods", "discover", "freeze_all", "get_method", "register"]
