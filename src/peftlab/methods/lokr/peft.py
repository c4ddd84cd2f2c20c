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

from peftlab.interop.peft_format import Exported, PeftConverter
from peftlab.methods.lycoris_peft import export_lycoris, import_lycoris


class LokrConverter(PeftConverter):
    """LoKr <-> PEFT ``LOKR`` (see the module docstring)."""

    peft_type = "LOKR"
    mapped = frozenset({"r", "alpha", "target_modules", "decompose_factor", "decompose_both"})
    ignored = frozenset({"init_weights", "rank_dropout", "module_dropout", "rank_dropout_scale",
                         "use_effective_conv2d"})

    def export(self, method: Any, base: str | None) -> Exported:
        cfg = method.config
        return export_lycoris(method, self.peft_type, {"decompose_factor": cfg.decompose_factor,
                                                       "decompose_both": cfg.decompose_both,
                                                       "rank_dropout_scale": False})

    def import_options(self, config: dict[str, Any], where: Path) -> dict[str, Any]:
        return {**import_lycoris(config, where), "decompose_factor": config.get("decompose_factor", -1),
                "decompose_both": bool(config.get("decompose_both"))}
