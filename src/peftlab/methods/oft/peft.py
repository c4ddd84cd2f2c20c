"""OFT <-> Hugging Face PEFT ``OFT`` (peft 0.21.2; nn.Linear targets).

The trained upper triangles are PEFT's tensors under PEFT's key and shape (``<module>.oft_R.weight`` (n or 1,
b(b-1)/2)), and every option that changes the rotation maps one to one: r, oft_block_size, block_share, coft, eps,
use_cayley_neumann, num_cayley_neumann_terms, module_dropout (PEFT 0.21.2 builds its dropout layer but its forward
never calls it, so PEFT trains without it; inference is the same either way). Both sides round a block size that
does not divide d_in to the same nearest divisor. PEFT 0.21.2's OFT wraps ``nn.Linear`` only, so an adapter on
GPT-2's ``Conv1D`` is not exported.

Import refuses files from before PEFT 0.14 (no ``oft_block_size``; PEFT refuses them too). A file that uses the
Cayley-Neumann series and was written before PEFT 0.18 (``peft_version``) was trained with the older series; PEFT
0.21.2 loads it with the new one and warns, and so does peftlab (same logits as PEFT). Exports record
``peft_version`` 0.21.2, the format they follow, so PEFT does not warn about them.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from peftlab.interop.peft_format import (
    PEFT_KEY_PREFIX,
    Exported,
    PeftConverter,
    PeftFormatError,
    base_module_names,
    minimal_names,
    peft_list_match,
    require_linear_layers,
    required,
)

FORMAT_VERSION = "0.21.2"  # the PEFT release whose OFT format and rotation these files follow
NEUMANN_CHANGED = (0, 18)  # PEFT 0.18 changed the Cayley-Neumann series' last term
ROTATION_OPTIONS = ("r", "oft_block_size", "block_share", "coft", "eps", "use_cayley_neumann",
                    "num_cayley_neumann_terms", "module_dropout")


def _version(text: Any) -> tuple[int, ...]:
    """(major, minor) of a ``peft_version`` such as ``0.17.1`` or ``0.18.0.dev0@abc``; (0, 0) when absent."""
    numbers = re.findall(r"\d+", str(text or "").partition("@")[0])
    return tuple(int(n) for n in numbers[:2]) if len(numbers) >= 2 else (0, 0)


class OftConverter(PeftConverter):
    """OFT <-> PEFT ``OFT`` (see the module docstring)."""

    peft_type = "OFT"
    mapped = frozenset({*ROTATION_OPTIONS, "target_modules"})
    ignored = frozenset({"init_weights", "fan_in_fan_out"})

    def export(self, method: Any, base: str | None) -> Exported:
        layers, cfg = method.layers, method.config
        require_linear_layers(layers, self.peft_type)
        state = {f"{PEFT_KEY_PREFIX}{k}": v for k, v in method.trainable_parameters().items()}
        options = {key: getattr(cfg, key) for key in ROTATION_OPTIONS}
        options.update({"target_modules": minimal_names(list(layers), base_module_names(method.model, layers),
                                                        peft_list_match),
                        "fan_in_fan_out": False, "bias": "none", "init_weights": True, "exclude_modules": None,
                        "layers_to_transform": None, "layers_pattern": None, "peft_version": FORMAT_VERSION})
        return options, state

    def import_options(self, config: dict[str, Any], where: Path) -> dict[str, Any]:
        if "oft_block_size" not in config:
            raise PeftFormatError(f"{where}: an OFT adapter without 'oft_block_size' was written by PEFT < 0.14, "
                                  f"whose OFT format PEFT 0.21.2 and peftlab no longer read; retrain it with PEFT "
                                  f">= 0.14")
        if config.get("use_cayley_neumann") and _version(config.get("peft_version")) < NEUMANN_CHANGED:
            warnings.warn(f"{where}: written by PEFT {config.get('peft_version') or '< 0.18'} with the Cayley-Neumann "
                          f"series, which PEFT 0.18 changed; it is read with the new series, as PEFT 0.21.2 does "
                          f"(retrain it with PEFT >= 0.18 for the rotation it was trained with)", stacklevel=2)
        options = {key: config[key] for key in ROTATION_OPTIONS if config.get(key) is not None}
        return {**options, "r": config.get("r") or 0, "oft_block_size": config.get("oft_block_size") or 0,
                "target_modules": required(config, "target_modules", where)}
