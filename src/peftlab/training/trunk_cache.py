"""Frozen-trunk caching (``train.cache_frozen_trunk``): run the decoder trunk once per training example.

When only the output head trains (last-layer tuning with an untied head), the trunk's hidden states at the labelled
positions are a fixed function of each example. The first time an example is seen they are computed under
``torch.no_grad()`` and kept on the training device; later epochs then run only the head and the cross-entropy:

    epoch 1:   h_i = trunk(x_i)[labelled positions]     # (n_i, d), stored with y_i (n_i,)
    epoch k>1: loss = CE(head(cat_i h_i), cat_i y_i)    # no trunk pass

The loss is the uncached one up to float rounding: a row's hidden states come from the batch it was first seen in,
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
from peftlab.models.arch import output_head, trunk
from peftlab.training.loss import IGNORE_INDEX, target_hidden_states

KEY = "train.cache_frozen_trunk"
AUTO_LIMIT_BYTES = 2 * 2**30  # auto turns the cache on only when its estimated size is at most this
# Model-config fields of dropout that is applied functionally (Llama's attention) or by modules (GPT-2).
DROPOUT_CONFIG_FIELDS = ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop")


class TrunkCache:
    """Per-example trunk features ``(hidden (n_i, d), targets (n_i,))`` keyed by the example's index in the training
    data, on the device the trunk ran on."""

    def __init__(self) -> None:
        self._features: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._features)

    def __contains__(self, index: int) -> bool:
        return index in self._features

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(h.nbytes + y.nbytes for h, y in self._features.values())

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
        if any(r not in self._features for r in rows):
            self._fill(model, rows, inputs)
        hidden = [self._features[r][0] for r in rows]
        targets = [self._features[r][1] for r in rows]
        return torch.cat(hidden), torch.cat(targets)

    @torch.no_grad()
    def _fill(self, model: nn.Module, rows: Sequence[int], inputs: dict[str, torch.Tensor]) -> None:
        hidden, targets = target_hidden_states(model, inputs)  # (N, d), (N,)
        # Row b owns the next counts[b] labelled positions: position t of row b is labelled when labels[b, t+1] is.
        counts = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
        for row, h, y in zip(rows, hidden.split(counts), targets.split(counts), strict=True):
            if row not in self._features:  # first seen wins: a row's features never change once cached
                self._features[row] = (h.detach().clone(), y.clone())  # clone: do not keep the whole batch alive


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
    """Cache size for ``target_tokens`` labelled positions: tokens x hidden size x element size of the head weight
    (the trunk's output dtype in practice; fp32 master heads make this an upper bound for bf16 bases)."""
    weight = output_head(model).weight  # (V, d)
    return target_tokens * weight.shape[1] * weight.element_size()


def _not_frozen_reason(method: PeftMethod) -> str:
    head = {id(p) for p in output_head(method.model).parameters()}
    outside = [name for name, p in method.trainable_parameters().items() if id(p) not in head]
    if outside:
        more = ", ..." if len(outside) > 3 else ""
        return f"it trains parameters before the output head ({', '.join(outside[:3])}{more})"
    return "its output head shares its weight with the input embeddings, so training it changes the trunk's inputs"


def use_trunk_cache(method: PeftMethod, mode: str | bool, target_tokens: int) -> bool:
    """Decide whether the trainer caches trunk features (``train.cache_frozen_trunk``).

    Args:
        method: the applied method (its :meth:`PeftMethod.frozen_trunk` says whether the trunk is fixed).
        mode: ``auto`` (on when the trunk is frozen, has no active dropout and the cache is estimated at
            <= 2 GiB), ``on`` (required; dropout only warns), ``off``; YAML's booleans read as on/off.
        target_tokens: labelled positions in the whole training set.

    Raises:
        ConfigError: ``on`` with a method whose trunk trains, or an unknown mode.
    """
    mode = cache_frozen_trunk_mode(mode, KEY)  # a TrainConfig built in code may not have been validated
    if mode == "off":
        return False
    frozen, dropout = method.frozen_trunk(), trunk_dropout(method.model)
    if mode == "on":
        if not frozen:
            raise ConfigError(f"{KEY}=on needs a frozen trunk (only the output head trains), but "
                              f"{type(method).__name__} does not have one: {_not_frozen_reason(method)}; "
                              f"use auto or off")
        if dropout:
            warnings.warn(f"{KEY}=on with dropout in the trunk ({'; '.join(dropout)}): the cached features freeze "
                          f"the dropout sample of the first epoch", stacklevel=3)
        return True
    return frozen and not dropout and estimated_bytes(method.model, target_tokens) <= AUTO_LIMIT_BYTES


def announce(target_tokens: int, n_examples: int, size: int) -> None:
    """The one log line printed when the cache turns on."""
    print(f"[train] frozen-trunk cache on: trunk features of {n_examples} examples ({target_tokens} target tokens, "
          f"~{size / 2**20:.1f} MiB) are computed once; later epochs run only the output head", file=sys.stderr)
