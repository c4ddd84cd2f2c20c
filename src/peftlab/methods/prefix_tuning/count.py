"""Prefix tuning's trainable count from the model config (k = n_kv_heads * head_dim, L layers, n tokens):

* ``reparametrize=false``: P (n, L * 2 * k);
* ``reparametrize=true``: P' (n, k) + MLP W_1 (h, k), b_1 (h), W_2 (L * 2 * k, h), b_2 (L * 2 * k) during
  training; after training the MLP is folded into P (n, L * 2 * k), which is what the adapter stores.
"""

from __future__ import annotations

from peftlab.methods.prefix_tuning.config import PrefixTuningConfig
from peftlab.models.shape import ModelShape


def folded_count(shape: ModelShape, config: PrefixTuningConfig) -> int:
    """n * L * 2 * k: the prefix P itself (trained directly, or what the MLP folds into)."""
    return config.n_tokens * shape.num_layers * 2 * shape.kv_dim


def count_prefix_tuning(shape: ModelShape, config: PrefixTuningConfig) -> int:
    """Parameters :func:`peftlab.methods.prefix_tuning.apply_prefix_tuning` trains (before any folding)."""
    if not config.reparametrize:
        return folded_count(shape, config)
    k, h, flat = shape.kv_dim, config.hidden_size, shape.num_layers * 2 * shape.kv_dim
    return config.n_tokens * k + (k * h + h) + (h * flat + flat)


def max_prefix_tokens(shape: ModelShape, config: PrefixTuningConfig) -> int:
    """The prefixes occupy cache positions ahead of the input: at most ``max_positions`` of them."""
    return shape.max_positions


def prefix_note(shape: ModelShape, config: PrefixTuningConfig) -> str:
    """With the MLP: how many parameters remain once it is folded after training."""
    if not config.reparametrize:
        return ""
    kept = "adapter keeps" if config.drop_mlp_after_training else "folding would keep"
    return (f"trains P' + MLP (hidden {config.hidden_size}); {kept} P = {folded_count(shape, config):,}; "
            f"method.reparametrize=false trains P only")
