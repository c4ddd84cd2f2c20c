"""LoKr <-> Hugging Face PEFT ``LOKR`` (nn.Linear targets).

The factors are PEFT's tensors under PEFT's keys and shapes (``<module>.lokr_w1`` (l, m) or ``lokr_w1_a`` /
``lokr_w1_b``, ``lokr_w2`` (k, n) or ``lokr_w2_a`` (k, r) / ``lokr_w2_b`` (r, n)), chosen by PEFT's rule from r,
decompose_factor and decompose_both; PEFT's scaling is alpha / r. PEFT 0.21.2's LoKr wraps ``nn.Linear`` (and
convolutions) only, so an adapter on GPT-2's ``Conv1D`` is not exported. Import: r, alpha, target_modules,
decompose_factor, decompose_both; a non-empty rank_pattern / alpha_pattern is refused. rank_dropout,
rank_dropout_scale and module_dropout act only while PEFT trains and are ignored; init_weights ("lycoris" or true)
only sets the starting values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


class LokrConverter(PeftConverter):
    """LoKr <-> PEFT ``LOKR`` (see the module docstring)."""

    peft_type = "LOKR"
    mapped = frozenset({"r", "alpha", "target_modules", "decompose_factor", "decompose_both"})
    ignored = frozenset({"init_weights", "rank_dropout", "module_dropout", "rank_dropout_scale",
                         "use_effective_conv2d"})

    def export(self, method: Any, base: str | None) -> Exported:
        cfg, layers = method.config, method.layers
        require_linear_layers(layers, self.peft_type)
        state = {f"{PEFT_KEY_PREFIX}{k}": v for k, v in method.trainable_parameters().items()}
        options = {"r": cfg.r, "alpha": cfg.alpha, "decompose_factor": cfg.decompose_factor,
                   "decompose_both": cfg.decompose_both,
                   "target_modules": minimal_names(list(layers), base_module_names(method.model, layers),
                                                   peft_list_match),
                   "rank_dropout": 0.0, "module_dropout": 0.0, "rank_dropout_scale": False, "init_weights": True,
                   "use_effective_conv2d": False, "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None,
                   "layers_to_transform": None, "layers_pattern": None}
        return options, state

    def import_options(self, config: dict[str, Any], where: Path) -> dict[str, Any]:
        return {"r": required(config, "r", where), "alpha": required(config, "alpha", where),
                "target_modules": required(config, "target_modules", where),
                "decompose_factor": config.get("decompose_factor", -1),
                "decompose_both": bool(config.get("decompose_both"))}
