"""Run the decoder trunk in two parts: the bottom blocks alone, or the top blocks from given hidden states.

Frozen-trunk caching of the lower blocks (``train.cache_frozen_trunk`` with last-N-blocks tuning) needs both halves of
one trunk forward::

    h_k = blocks[k-1](... blocks[0](embed(x)) ...)        # (B, T, d): hidden_entering(model, k, inputs)
    out = norm(blocks[L-1](... blocks[k](h_k) ...))        # (B, T, d): trunk(model)(**inputs) under entering_at(...)

Neither half re-implements the model's forward. Both run the trunk's own ``forward`` with the block list temporarily
cut to ``blocks[:k]`` or ``blocks[k:]``, so the position ids, the rotary embeddings (Llama), the position embeddings
(GPT-2) and the causal + padding mask are built from ``input_ids`` and ``attention_mask`` exactly as in an uncut
forward, whatever the transformers version. The upper half still embeds the tokens (a lookup, and for GPT-2 the
position embeddings added), then replaces the result with ``h_k`` at the input of block k.

A model whose blocks are not interchangeable by position (``config.layer_types`` with more than one kind, e.g.
Qwen2 with sliding-window layers, where the forward picks each block's mask by its index in the list) is refused:
cutting the list would give block k the mask of block 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from peftlab.models.arch import final_norm, module_name, transformer_blocks, trunk


def can_enter_mid_trunk(model: nn.Module) -> str | None:
    """None when :func:`entering_at` and :func:`hidden_entering` work on ``model``, else the reason they do not."""
    try:
        transformer_blocks(model)
        final_norm(model)
    except TypeError as exc:
        return str(exc)
    kinds = set(getattr(model.config, "layer_types", None) or [])
    if len(kinds) > 1:
        return (f"its blocks are of several kinds ({', '.join(sorted(kinds))}) that the forward picks by position in "
                f"the block list")
    return None


@contextlib.contextmanager
def blocks_cut_to(model: nn.Module, start: int, stop: int) -> Iterator[nn.ModuleList]:
    """Within the context the trunk's forward runs only ``blocks[start:stop]`` (the same module objects, with their
    hooks, wrappers and ``layer_idx``); the full list is restored on exit, also after an exception.

    Yields:
        The cut list.
    """
    reason = can_enter_mid_trunk(model)
    if reason is not None:
        raise TypeError(f"cannot run part of the trunk of {type(model).__name__}: {reason}")
    blocks = transformer_blocks(model)
    if not 0 <= start < stop <= len(blocks):
        raise ValueError(f"blocks [{start}, {stop}) is not a non-empty range of the {len(blocks)} blocks")
    path = module_name(model, blocks)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    cut = nn.ModuleList(list(blocks)[start:stop])
    setattr(parent, attr, cut)
    try:
        yield cut
    finally:
        setattr(parent, attr, blocks)


@torch.no_grad()
def hidden_entering(model: nn.Module, block: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The hidden states (B, T, d) that enter ``blocks[block]`` (1 <= block <= L-1), without autograd.

    Args:
        model: a ``*ForCausalLM`` model.
        block: index of the first block the caller will run itself.
        inputs: the trunk's keyword arguments (``input_ids`` or ``inputs_embeds``, ``attention_mask``, ...; a
            ``labels`` entry is ignored).

    The trunk runs embeddings and ``blocks[:block]``; what reaches the final norm is the output of
    ``blocks[block - 1]`` (the norm itself also runs, on a value that is thrown away).
    """
    captured: list[torch.Tensor] = []
    handle = final_norm(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        with blocks_cut_to(model, 0, block):
            trunk(model)(**_trunk_kwargs(inputs), use_cache=False)
    finally:
        handle.remove()
    return captured[0]


class _EnterWith(nn.Module):
    """Stands in for the first block of the cut list: calls that block with ``hidden`` instead of the hidden states
    the trunk passes (the embeddings' output), every other argument unchanged."""

    def __init__(self, block: nn.Module, hidden: torch.Tensor) -> None:
        super().__init__()
        self.block = block
        self.hidden = hidden  # (B, T, d); a plain attribute, not a buffer: it is data, not state

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if hidden_states.shape[:-1] != self.hidden.shape[:-1]:
            raise ValueError(f"the hidden states to enter with are {tuple(self.hidden.shape)} but the trunk's inputs "
                             f"give {tuple(hidden_states.shape)}")
        return self.block(self.hidden.to(hidden_states.dtype), *args, **kwargs)


@contextlib.contextmanager
def entering_at(model: nn.Module, block: int, hidden: torch.Tensor) -> Iterator[None]:
    """Within the context, a trunk forward runs ``blocks[block:]`` and the final norm on ``hidden`` (B, T, d), the
    hidden states entering ``blocks[block]``; the inputs still give the shapes, positions and attention mask.

    Args:
        model: a ``*ForCausalLM`` model.
        block: the first block to run (1 <= block <= L-1).
        hidden: what :func:`hidden_entering` returns for the same inputs (or a cached copy of it; positions that
            are padding may hold any finite value: with right padding no real position attends to them).
    """
    with blocks_cut_to(model, block, len(transformer_blocks(model))) as cut:
        cut[0] = _EnterWith(cut[0], hidden)
        yield


def _trunk_kwargs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in inputs.items() if k != "labels"}
