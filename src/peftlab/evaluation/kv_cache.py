"""A preallocated KV cache for decoding: keys and values are written into buffers sized for the whole generation
instead of growing by concatenation, and finished rows can be dropped from the batch.

Hugging Face's ``DynamicLayer`` appends each decode step's keys with ``torch.cat``, which copies the layer's whole
cache every step: with B = 16 rows of 600 cached positions on SmolLM2 (30 layers, 3 KV heads of 64) that is about
0.5 GB of copying per generated token. :class:`PreallocatedLayer` copies the prefill's keys once into a buffer
(B, H, S + room, hd) and afterwards writes one column per step; ``keys``/``values`` are views of the filled part,
so attention reads exactly the positions it read before and the numbers do not change.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values as views of the first ``length`` positions of preallocated buffers.

    Args:
        keys: the prefilled keys (B, H, S, hd); values likewise.
        room: positions to reserve beyond S (the new tokens to generate).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        super().__init__()
        batch, heads, length, dim = keys.shape
        self._keys = keys.new_empty(batch, heads, length + room, dim)
        self._values = values.new_empty(batch, values.shape[1], length + room, values.shape[-1])
        self._keys[..., :length, :] = keys
        self._values[..., :length, :] = values
        self.device, self.is_initialized = keys.device, True
        self._set_length(length)

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys, self.values = self._keys[..., :length, :], self._values[..., :length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H, n, hd) new keys/values after the filled part; returns everything cached so far."""
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            raise ValueError(f"the preallocated KV cache holds {self._keys.shape[-2]} positions; {end} needed")
        self._keys[..., self.length:end, :] = key_states
        self._values[..., self.length:end, :] = value_states
        self._set_length(end)
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions (transformers 5.24's convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of positions to remove")
        self._set_length(self.length + tokens_to_remove)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (a 1-D index tensor), in that order."""
        self._keys, self._values = self._keys.index_select(0, rows), self._values.index_select(0, rows)
        self._set_length(self.length)


def preallocate(cache: Cache, room: int) -> bool:
    """Replace every plain ``DynamicLayer`` of ``cache`` by a :class:`PreallocatedLayer` with ``room`` free positions.

    Returns False (and changes nothing) when some layer is of another kind (sliding-window, quantized, ...), which
    keeps its own update rule.
    """
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return False
    cache.layers = [PreallocatedLayer(layer.keys, layer.values, room) for layer in layers]
    return True


def keep_rows(cache: Cache, rows: torch.Tensor) -> None:
    """Drop every batch row of a preallocated cache but ``rows``."""
    for layer in cache.layers:
        layer.keep_rows(rows)
