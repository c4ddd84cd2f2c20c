"""LoRA's trainable count from the model config: sum over targets of r * (d_in + d_out_slice), + d_out_slice with
DoRA (one magnitude per output feature). GPT-2 q/k/v slices of ``c_attn`` each have their own A (r, d) and B (d, r).
"""

from __future__ import annotations

from peftlab.methods.lora.config import LoraConfig
from peftlab.models.shape import ModelShape, resolve_target_shapes


def count_lora(shape: ModelShape, config: LoraConfig) -> int:
    """Parameters :func:`peftlab.methods.lora.apply_lora` trains on a model of this shape.

    Raises:
        ConfigError: ``method.target_modules`` matches nothing (as ``apply`` would).
    """
    targets = resolve_target_shapes(shape, config.target_modules, key="method.target_modules")
    per_rank = sum(t.in_features + t.out_size for t in targets)  # A: (r, d_in), B: (d_out_slice, r)
    magnitudes = sum(t.out_size for t in targets) if config.use_dora else 0
    return config.r * per_rank + magnitudes
