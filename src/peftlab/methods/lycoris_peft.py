"""What LoHa and LoKr share in Hugging Face PEFT's format (PEFT's LyCORIS-family ``LOHA`` / ``LOKR``): the trained
factors are PEFT's tensors under PEFT's keys and shapes, PEFT's scaling is alpha / r, and PEFT 0.21.2 wraps
``nn.Linear`` only (an adapter on GPT-2's ``Conv1D`` is not exported). Each method's ``peft.py`` adds its own
options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftlab.interop.peft_format import (
    PEFT_KEY_PREFIX,
    Exported,
    peft_target_modules,
    require_linear_layers,
    required,
)

# PEFT's LyCORIS options peftlab's LoHa and LoKr have no counterpart for, at the values under which PEFT computes
# what peftlab computes (rank_dropout and module_dropout act only while PEFT trains).
EXPORT_DEFAULTS: dict[str, Any] = {
    "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True, "use_effective_conv2d": False,
    "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None, "layers_to_transform": None,
    "layers_pattern": None,
}


def export_lycoris(method: Any, peft_type: str, options: dict[str, Any]) -> Exported:
    """PEFT's config and weights of a LoHa or LoKr ``method``: r, alpha, the method's own ``options``, the
    target_modules and :data:`EXPORT_DEFAULTS`; the trainable tensors under PEFT's keys.

    Raises:
        PeftFormatError: a layer is a GPT-2 ``Conv1D`` or a slice of one.
    """
    require_linear_layers(method.layers, peft_type)
    state = {f"{PEFT_KEY_PREFIX}{k}": v for k, v in method.trainable_parameters().items()}
    config = {"r": method.config.r, "alpha": method.config.alpha, **options,
              "target_modules": peft_target_modules(method.model, method.layers), **EXPORT_DEFAULTS}
    return config, state


def import_lycoris(config: dict[str, Any], where: Path) -> dict[str, Any]:
    """r, alpha and target_modules of a PEFT LyCORIS config (``where`` names it when one is missing)."""
    return {"r": required(config, "r", where), "alpha": required(config, "alpha", where),
            "target_modules": required(config, "target_modules", where)}
