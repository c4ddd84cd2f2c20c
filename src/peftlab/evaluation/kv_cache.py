"""Preallocated KV caches for decoding: keys and values are written into buffers sized for the whole generation
instead of growing by concatenation, and finished rows can be dropped from the batch.

Two layouts: :class:`PreallocatedLayer` keeps a left-padded batch's common length (every row writes the same
column); :class:`SlotLayer` gives each row its own length (:class:`Slots`), so a finished row can take a new
sequence while the others go on (continuous batching), and with ``static`` its shapes never change (compiling).

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


class Slots:
    """What the layers of a slot cache share: where each row writes next and which columns each row attends to.

    A slot cache (:func:`to_slots`) holds R rows that each carry one sequence at its own length, so a finished row
    can take a new prompt (continuous batching) while the others go on. Row r's cached positions sit in columns
    ``[0, lengths[r])`` (a newcomer's prefill is copied to column 0, its own left padding and virtual tokens
    included), and a decode step writes row r's new key to column ``lengths[r]``. The attention of every row reads
    the same columns, the first ``max(lengths) + 1`` (or all ``capacity`` with ``static``); ``valid`` masks out what
    a row does not own: its padding, and the stale columns of an earlier occupant beyond its own length.

    Attributes:
        lengths: (R,) long, the filled columns of each row.
        valid: (R, capacity) bool, the columns each row attends to.
        static: attend over all ``capacity`` columns at every step, so a decode step's shapes never change (what
            ``torch.compile`` needs to compile it once); otherwise over the filled part only (less work uncompiled).
        attended: the columns the current step reads (set by :meth:`begin_step`).
    """

    def __init__(self, mask: torch.Tensor, capacity: int, static: bool) -> None:
        batch, length = mask.shape
        self.lengths = torch.full((batch,), length, dtype=torch.long, device=mask.device)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=mask.device)
        self.valid[:, :length] = mask.bool()
        self.capacity, self.static = capacity, static
        self.attended = capacity if static else length

    def begin_step(self) -> torch.Tensor:
        """Mark each row's next column as its own; returns the attention mask of the step, (R, attended)."""
        rows = torch.arange(len(self.lengths), device=self.lengths.device)
        if int(self.lengths.max()) >= self.capacity:
            raise ValueError(f"the slot KV cache holds {self.capacity} positions per row; a row needs more")
        self.valid[rows, self.lengths] = True
        self.attended = self.capacity if self.static else int(self.lengths.max()) + 1
        return self.valid[:, :self.attended]

    def end_step(self, advanced: torch.Tensor) -> None:
        """Rows with ``advanced`` (R,) set keep the column they just wrote; the others overwrite it next step."""
        self.lengths += advanced.long()

    def fill(self, row: int, mask: torch.Tensor) -> None:
        """Row ``row`` now holds a prefilled sequence with attention mask ``mask`` (L,)."""
        self.lengths[row] = mask.shape[0]
        self.valid[row] = False
        self.valid[row, :mask.shape[0]] = mask.bool()

    def keep(self, rows: torch.Tensor) -> None:
        self.lengths, self.valid = self.lengths[rows], self.valid[rows]


class SlotLayer(DynamicLayer):
    """One layer of a slot cache: keys and values in (R, H, capacity, hd) buffers, one sequence per row.

    ``update`` takes one new position per row, (R, H, 1, hd), writes it to column ``lengths[r]`` of row r and
    returns the columns the step attends to, (R, H, attended, hd). The buffers start as zeros: a row attends to
    stale columns with weight 0, and 0 times an uninitialised NaN would still be NaN.
    """

    def __init__(self, slots: Slots, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        batch, heads, length, _ = keys.shape
        self.slots = slots
        self._keys = keys.new_zeros(batch, heads, slots.capacity, keys.shape[-1])
        self._values = values.new_zeros(batch, values.shape[1], slots.capacity, values.shape[-1])
        self._keys[..., :length, :], self._values[..., :length, :] = keys, values
        self.device, self.is_initialized = keys.device, True
        self._view()

    def _view(self) -> None:
        self.keys = self._keys[..., :self.slots.attended, :]
        self.values = self._values[..., :self.slots.attended, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[-2] != 1:
            raise ValueError("a slot KV cache takes one new position per row; prefill into a plain cache and fill()")
        rows = torch.arange(key_states.shape[0], device=key_states.device)
        # (R, H, hd) into (R, H, hd), in the buffers' dtype: a cache may hold another dtype than a step's new keys
        # (prefix tuning's fp32 prefix values under bf16 autocast make the prefill's values fp32, the step's are
        # bf16), and an indexed write does not cast as the slice copy of a plain or preallocated layer does
        self._keys[rows, :, self.slots.lengths] = key_states[:, :, 0].to(self._keys.dtype)
        self._values[rows, :, self.slots.lengths] = value_states[:, :, 0].to(self._values.dtype)
        self._view()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """The columns before the step's own: the mask code then sizes the step's mask to ``attended`` columns."""
        return self.slots.attended - 1

    def get_max_length(self) -> int:
        return self.slots.capacity

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a slot KV cache has no common length to crop")

    def fill(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copy one prefilled sequence's keys and values, (H, L, hd), into row ``row`` from column 0."""
        self._keys[row, :, :keys.shape[1]], self._values[row, :, :values.shape[1]] = keys, values

    def keep_rows(self, rows: torch.Tensor) -> None:
        self._keys, self._values = self._keys.index_select(0, rows), self._values.index_select(0, rows)
        self._view()


def to_slots(cache: Cache, mask: torch.Tensor, capacity: int, static: bool = False) -> Slots | None:
    """Turn a prefilled cache into a slot cache of ``capacity`` columns per row; ``mask`` (R, S) is the prefill's.

    Returns the :class:`Slots` its layers share, or None (and changes nothing) when some layer is of another kind
    than a plain ``DynamicLayer`` (sliding-window, quantized, ...), which keeps its own update rule.
    """
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return None
    slots = Slots(mask, capacity, static)
    cache.layers = [SlotLayer(slots, layer.keys, layer.values) for layer in layers]
    return slots


def fill_rows(cache: Cache, slots: Slots, rows: list[int], source: Cache, source_mask: torch.Tensor) -> None:
    """Copy the sequences of a prefilled plain cache ``source`` (its row i, mask ``source_mask[i]``) into ``rows``."""
    for i, row in enumerate(rows):
        slots.fill(row, source_mask[i])
        for layer, new in zip(cache.layers, source.layers, strict=True):
            layer.fill(row, new.keys[i], new.values[i])
