"""Frozen-trunk caching (``train.cache_frozen_trunk``): run the frozen part of the trunk once per training example.

Two cases, chosen from what the method declares (:meth:`PeftMethod.frozen_trunk`, :meth:`PeftMethod.frozen_blocks`):

* Only the output head trains (last-layer tuning with an untied head): the trunk's hidden states at the labelled
  positions are a fixed function of each example (:class:`TrunkCache`). The first time an example is seen they are
  computed under ``torch.no_grad()`` and kept on the training device; later epochs then run only the head and the
  cross-entropy::

      epoch 1:   h_i = trunk(x_i)[labelled positions]     # (n_i, d), stored with y_i (n_i,)
      epoch k>1: loss = CE(head(cat_i h_i), cat_i y_i)    # no trunk pass

* The bottom k blocks and everything below them are frozen (last-N-blocks tuning, k = L - N): the hidden states
  entering block k are a fixed function of each example (:class:`BlockInputCache`), at every real position, since
  the trained blocks above attend over all of them. Each training step runs blocks k..L-1, the norm and the head
  from the cached states (:mod:`peftlab.models.trunk_entry`); the bottom k blocks run once per example::

      first time:  g_i = blocks[:k](embed(x_i))                        # (T_i, d), T_i = the example's real length
      every step:  loss = CE(head(norm(blocks[k:](pad(g)))), y)         # position ids and mask from the batch

The loss is the uncached one up to float rounding: a row's cached states come from the batch it was first seen in,
and a trunk pass over a differently padded batch can round the last bit differently.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from peftlab.config import ConfigError, cache_frozen_trunk_mode
from peftlab.methods.base import PeftMethod
from peftlab.models.arch import input_embeddings, is_tied, output_head, transformer_blocks, trunk
from peftlab.models.trunk_entry import can_enter_mid_trunk, entering_at, hidden_entering
from peftlab.training.loss import IGNORE_INDEX, target_hidden_states

KEY = "train.cache_frozen_trunk"
AUTO_LIMIT_BYTES = 2 * 2**30  # auto turns the cache on only when its estimated size is at most this
# Model-config fields of dropout that is applied functionally (Llama's attention) or by modules (GPT-2).
DROPOUT_CONFIG_FIELDS = ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop")


class _PerExample:
    """Tensors per training example, keyed by the example's index in the training data; ``what`` and ``later``
    describe the cache in the line :func:`announce` prints."""

    what = later = ""

    def __init__(self) -> None:
        self._rows: dict[int, tuple[torch.Tensor, ...]] = {}
        self.planned_bytes = 0  # the size estimated when the cache was chosen (announced, compared with the limit)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, index: int) -> bool:
        return index in self._rows

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(t.nbytes for row in self._rows.values() for t in row)


class TrunkCache(_PerExample):
    """Per-example trunk features ``(hidden (n_i, d), targets (n_i,))``, on the device the trunk ran on."""

    what, later = "trunk features", "later epochs run only the output head"

    def features(self, model: nn.Module, rows: Sequence[int],
                 inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's labelled-position hidden states and targets, in row order, from the cache.

        Rows not cached yet are filled first by one no-grad trunk pass over the whole batch (run it inside the same
        autocast context as the uncached path, so the numbers are the same).

        Args:
            model: the ``*ForCausalLM`` model whose trunk is frozen.
            rows: the example index of each batch row (B,); duplicates are fine (a zero-weight dummy row).
            inputs: the prepared model inputs of these rows (``labels`` (B, T) included).

        Returns:
            ``(h, y)``: h (N, d) and y (N,), N = the rows' labelled positions, exactly as
            :func:`peftlab.training.loss.target_hidden_states` orders them (row by row, left to right).
        """
        if len(rows) != inputs["labels"].shape[0]:
            raise ValueError(f"trunk cache: {len(rows)} example indices for a batch of {inputs['labels'].shape[0]} "
                             f"rows")
        if any(r not in self._rows for r in rows):
            self._fill(model, rows, inputs)
        hidden = [self._rows[r][0] for r in rows]
        targets = [self._rows[r][1] for r in rows]
        return torch.cat(hidden), torch.cat(targets)

    @torch.no_grad()
    def _fill(self, model: nn.Module, rows: Sequence[int], inputs: dict[str, torch.Tensor]) -> None:
        hidden, targets = target_hidden_states(model, inputs)  # (N, d), (N,)
        # Row b owns the next counts[b] labelled positions: position t of row b is labelled when labels[b, t+1] is.
        counts = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
        for row, h, y in zip(rows, hidden.split(counts), targets.split(counts), strict=True):
            if row not in self._rows:  # first seen wins: a row's features never change once cached
                self._rows[row] = (h.detach().clone(), y.clone())  # clone: do not keep the whole batch alive


class BlockInputCache(_PerExample):
    """Per-example hidden states entering block ``first`` (``(T_i, d)``, the example's real positions), on the device
    the bottom blocks ran on.

    Args:
        first: the first trained block; blocks ``0..first-1`` (and the embeddings) are frozen.
    """

    def __init__(self, first: int) -> None:
        super().__init__()
        self.first = first
        self.what = f"hidden states entering block {first}"
        self.later = f"later epochs run only blocks {first} and up and the output head"

    def features(self, model: nn.Module, rows: Sequence[int],
                 inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's labelled-position hidden states (after the final norm) and targets, with autograd through the
        trained top blocks; the bottom blocks run only for rows not cached yet (one no-grad pass over the batch).

        Args:
            model: the ``*ForCausalLM`` model.
            rows: the example index of each batch row (B,); duplicates are fine (a zero-weight dummy row).
            inputs: the prepared, right-padded model inputs of these rows (``attention_mask`` and ``labels`` (B, T)).

        Returns:
            ``(h, y)`` as :func:`peftlab.training.loss.target_hidden_states` returns them for the whole trunk.
        """
        mask = inputs["attention_mask"]  # (B, T)
        if len(rows) != mask.shape[0]:
            raise ValueError(f"trunk cache: {len(rows)} example indices for a batch of {mask.shape[0]} rows")
        lengths = mask.sum(dim=1)  # (B,)
        positions = torch.arange(mask.shape[1], device=mask.device)
        if not torch.equal(mask.bool(), positions[None, :] < lengths[:, None]):
            raise ValueError("trunk cache: the block-input cache needs right-padded rows (real tokens first)")
        if any(r not in self._rows for r in rows):
            self._fill(model, rows, inputs, lengths.tolist())
        # Padding positions enter as zeros: with right padding and a causal mask no real position attends to them.
        first = self._rows[rows[0]][0]
        entry = first.new_zeros((mask.shape[0], mask.shape[1], first.shape[-1]))  # (B, T, d)
        for b, row in enumerate(rows):
            state = self._rows[row][0]
            entry[b, :state.shape[0]] = state
        with entering_at(model, self.first, entry):
            return target_hidden_states(model, inputs)

    def _fill(self, model: nn.Module, rows: Sequence[int], inputs: dict[str, torch.Tensor],
              lengths: list[int]) -> None:
        hidden = hidden_entering(model, self.first, inputs)  # (B, T, d), no autograd
        for b, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            if row not in self._rows:  # first seen wins: a row's states never change once cached
                self._rows[row] = (hidden[b, :n].clone(),)  # clone: do not keep the whole batch alive


TrunkFeatureCache = TrunkCache | BlockInputCache
CacheOrNone = TrunkFeatureCache | None


def trunk_dropout(model: nn.Module) -> list[str]:
    """What makes the trunk random in train mode: ``nn.Dropout`` modules with p > 0 and positive dropout fields of
    the model config (names; empty when the trunk is deterministic)."""
    found = [f"config.{name}={getattr(model.config, name)}" for name in DROPOUT_CONFIG_FIELDS
             if (getattr(getattr(model, "config", None), name, 0) or 0) > 0]
    modules = [name or "<trunk>" for name, m in trunk(model).named_modules()
               if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if modules:
        found.append(f"{len(modules)} dropout module(s) with p > 0 (e.g. {modules[0]})")
    return found


def estimated_bytes(model: nn.Module, target_tokens: int) -> int:
    """Head-feature cache size for ``target_tokens`` labelled positions: tokens x hidden size x element size of the
    head weight (the trunk's output dtype in practice; fp32 master heads make this an upper bound for bf16 bases)."""
    weight = output_head(model).weight  # (V, d)
    return target_tokens * weight.shape[1] * weight.element_size()


def block_cache_bytes(model: nn.Module, input_tokens: int) -> int:
    """Block-input cache size for ``input_tokens`` real positions: tokens x hidden size x element size of the input
    embedding (the dtype of the residual stream)."""
    weight = input_embeddings(model).weight  # (V, d)
    return input_tokens * weight.shape[1] * weight.element_size()


def _not_frozen_reason(method: PeftMethod) -> str:
    """Why neither the whole trunk nor its bottom block is fixed, naming what trains there."""
    model, trained = method.model, method.trainable_parameters()
    if is_tied(model) and any(p is output_head(model).weight for p in trained.values()):
        return ("its output head shares its weight with the input embeddings, so training it changes the trunk's "
                "inputs")
    bottom = {id(p) for m in (input_embeddings(model), transformer_blocks(model)[0]) for p in m.parameters()}
    for where, ids in (("in the first block or the input embeddings", bottom),
                       ("before the output head", {id(p) for p in model.parameters()} - _head_ids(model))):
        names = [name for name, p in trained.items() if id(p) in ids]
        if names:
            return f"it trains parameters {where} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
    return "it trains parameters outside the model or changes its inputs"


def _head_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in output_head(model).parameters()}


def _frozen_part(method: PeftMethod, input_tokens: int, target_tokens: int) -> tuple[CacheOrNone, int, str]:
    """The cache the method's frozen part allows (None: none), its estimated bytes, and why there is none."""
    model = method.model
    if method.frozen_trunk():
        return TrunkCache(), estimated_bytes(model, target_tokens), ""
    first = method.frozen_blocks()
    if first < 1:
        return None, 0, _not_frozen_reason(method)
    reason = can_enter_mid_trunk(model)
    if reason is not None:
        return None, 0, f"the trunk of {type(model).__name__} cannot be entered at block {first}: {reason}"
    return BlockInputCache(first), block_cache_bytes(model, input_tokens), ""


def trunk_cache_for(method: PeftMethod, mode: str | bool, input_tokens: int,
                    target_tokens: int) -> TrunkFeatureCache | None:
    """The cache the trainer uses (``train.cache_frozen_trunk``), or None.

    Args:
        method: the applied method; :meth:`PeftMethod.frozen_trunk` (only the head trains: cache the head's input
            at labelled positions) is preferred to :meth:`PeftMethod.frozen_blocks` (cache the input of the first
            trained block at every real position).
        mode: ``auto`` (on when part of the trunk is frozen, it has no active dropout and the cache is estimated at
            <= 2 GiB), ``on`` (required; dropout only warns), ``off``; YAML's booleans read as on/off.
        input_tokens: real positions in the whole training set.
        target_tokens: labelled positions in the whole training set.

    Raises:
        ConfigError: ``on`` with a method whose whole trunk trains, or an unknown mode.
    """
    mode = cache_frozen_trunk_mode(mode, KEY)  # a TrainConfig built in code may not have been validated
    if mode == "off":
        return None
    cache, size, reason = _frozen_part(method, input_tokens, target_tokens)
    dropout = trunk_dropout(method.model)
    if mode == "on":
        if cache is None:
            raise ConfigError(f"{KEY}=on needs a frozen trunk (only the output head trains) or frozen lower blocks "
                              f"(only the top blocks train), but {type(method).__name__} has neither: {reason}; "
                              f"use auto or off")
        if dropout:
            warnings.warn(f"{KEY}=on with dropout in the trunk ({'; '.join(dropout)}): the cached features freeze "
                          f"the dropout sample of the first epoch", stacklevel=3)
    elif cache is None or dropout or size > AUTO_LIMIT_BYTES:
        return None
    cache.planned_bytes = size
    return cache


def announce(cache: TrunkFeatureCache, n_examples: int) -> None:
    """The one log line printed when the cache turns on."""
    print(f"[train] frozen-trunk cache on: {cache.what} of {n_examples} examples (~{cache.planned_bytes / 2**20:.1f} "
          f"MiB) are computed once; {cache.later}", file=sys.stderr)
