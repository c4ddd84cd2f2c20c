"""MAM's trainable count from the model config: the sum of its parts' counts (prefix tuning's, before any folding,
and the FFN adapters' L (2 d b + b + d))."""

from __future__ import annotations

from peftlab.methods.adapters.count import adapter_note, count_adapters
from peftlab.methods.mam.config import MamConfig
from peftlab.methods.prefix_tuning.count import count_prefix_tuning, prefix_note
from peftlab.models.shape import ModelShape


def count_mam(shape: ModelShape, config: MamConfig) -> int:
    """Parameters :func:`peftlab.methods.mam.apply_mam` trains on a model of this shape."""
    return count_prefix_tuning(shape, config.prefix_config()) + count_adapters(shape, config.adapter_config())


def mam_note(shape: ModelShape, config: MamConfig) -> str:
    """Both parts' remarks: the adapters' bottleneck and what the prefix keeps once folded."""
    notes = [adapter_note(shape, config.adapter_config()), prefix_note(shape, config.prefix_config())]
    return "; ".join(n for n in notes if n)
