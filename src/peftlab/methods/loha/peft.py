"""LoHa <-> Hugging Face PEFT ``LOHA`` (nn.Linear targets).

The four factors are PEFT's tensors under PEFT's keys and shapes (``<module>.hada_w1_a`` (d_out, r), ``hada_w1_b``
(r, d_in), ``hada_w2_a``, ``hada_w2_b``) and PEFT's scaling is alpha / r, so export and import copy them. PEFT
0.21.2's LoHa wraps ``nn.Linear`` (and convolutions) only, so an adapter on GPT-2's ``Conv1D`` is not exported.
Import: r, alpha, target_modules; a non-empty rank_pattern / alpha_pattern is refused (one rank here).
rank_dropout and module_dropout are ignored: they act only while PEFT trains (an imported adapter computes the same)
and peftlab's LoHa has neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from peftlab.interop.peft_format import (
    PEFT_KEY_PREFIX,
    Exported,
    PeftConverter,
    base_module_names,
    minimal_names,
    peft_list_match,
    require_linear_layers,
    required,
)


class LohaConverter(PeftConverter):
    """LoHa <-> PEFT ``LOHA`` (see the module docstring)."""

    peft_type = "LOHA"
    mapped = frozenset({"r", "alpha", "target_modules"})
    ignored = frozenset({"init_weights", "rank_dropout", "module_dropout", "use_effective_conv2d"})

    def export(self, method: Any, base: str | None) -> Exported:
        layers = method.layers
        require_linear_layers(layers, self.peft_type)
        state: dict[str, torch.Tensor] = {f"{PEFT_KEY_PREFIX}{k}": v for k, v in method.trainable_parameters().items()}
        options = {"r": method.config.r, "alpha": method.config.alpha,
                   "target_modules": minimal_names(list(layers), base_module_names(method.model, layers),
                                                   peft_list_match),
                   "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True, "use_effective_conv2d": False,
                   "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None, "layers_to_transform": None,
                   "layers_pattern": None}
        return options, state

    def import_options(self, config: dict[str, Any], where: Path) -> dict[str, Any]:
        return {"r": required(config, "r", where), "alpha": required(config, "alpha", where),
                "target_modules": required(config, "target_modules", where)}
