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

from peftlab.interop.peft_format import Exported, PeftConverter
from peftlab.methods.lycoris_peft import export_lycoris, import_lycoris


class LohaConverter(PeftConverter):
    """LoHa <-> PEFT ``LOHA`` (see the module docstring)."""

    peft_type = "LOHA"
    mapped = frozenset({"r", "alpha", "target_modules"})
    ignored = frozenset({"init_weights", "rank_dropout", "module_dropout", "use_effective_conv2d"})

    def export(self, method: Any, base: str | None) -> Exported:
        return export_lycoris(method, self.peft_type, {})

    def import_options(self, config: dict[str, Any], where: Path) -> dict[str, Any]:
        return import_lycoris(config, where)
