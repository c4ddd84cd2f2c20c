"""Block-level gradient checkpointing: recompute each transformer block's activations in the backward pass.

See :func:`checkpoint_blocks`. It works on any GPT-2 or Llama-family model through
:func:`peftlab.models.arch.transformer_blocks`, with or without a method applied.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache

from peftlab.models.arch import transformer_blocks

# A KV cache object whose ``update()`` stores nothing (it returns past + new keys without appending) sets this
# attribute True: replaying a block's forward in the backward pass then sees the same cache and gives the same
# tensors. Prefix tuning's training-time cache does (``peftlab.methods.prefix_tuning.PrefixCache``).
REPLAY_SAFE_ATTR = "replay_safe"


def hf_gradient_checkpointing(model: nn.Module) -> bool:
    """True when Hugging Face's own checkpointing (``model.activation_checkpointing_enable()``, formerly
    ``gradient_checkpointing_enable()``) is on in some module."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


class CheckpointedForward:
    """The instance-level ``forward`` that :func:`checkpoint_blocks` installs on one transformer block.

    In training mode with autograd on, the block's forward runs under ``torch.utils.checkpoint`` (non-reentrant):
    only its inputs are kept, and the backward pass runs the forward again to get the activations it needs. Otherwise
    (eval mode, ``torch.no_grad()``, generation) it calls the block's forward directly. Module hooks (FSDP's
    unshard, ...) run in ``__call__``, outside the checkpointed region, so a replay does not run them twice.

    Args:
        block: the wrapped block.
        layer_idx: the block's index (its layer in a KV cache).
        previous: an instance-level ``forward`` that was already set (e.g. by accelerate), called instead of the
            class's; restored by ``checkpoint_blocks(model, enabled=False)``.
    """

    def __init__(self, block: nn.Module, layer_idx: int, previous: Any = None) -> None:
        self.block, self.layer_idx, self.previous = block, layer_idx, previous

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        block = self.block
        # Looked up per call, so a class swapped in later (FSDP2's FSDP<Block>) is honoured.
        forward = self.previous if self.previous is not None else partial(type(block).forward, block)
        if not (block.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        args = tuple(_replayable_cache(a, self.layer_idx) for a in args)
        kwargs = {k: _replayable_cache(v, self.layer_idx) for k, v in kwargs.items()}
        # kwargs are bound with partial so none of them is taken for one of checkpoint()'s own options.
        return checkpoint(partial(forward, **kwargs), *args, use_reentrant=False)


def _replayable_cache(value: Any, layer_idx: int) -> Any:
    """``value`` itself unless it is a KV cache that a replayed forward would write to a second time.

    Such a cache that holds nothing for this layer (the one a training forward with ``use_cache=True`` creates) is
    dropped, as Hugging Face's checkpointing drops it: the block then attends over its own keys only, which is the
    same result, and nothing reads a training forward's cache. One that holds past keys cannot be replayed.
    """
    if not isinstance(value, Cache) or getattr(value, REPLAY_SAFE_ATTR, False):
        return value
    if value.get_seq_length(layer_idx) == 0:
        return None
    raise ValueError(
        f"gradient checkpointing replays block {layer_idx}'s forward in the backward pass, which would append its "
        f"keys to this {type(value).__name__} a second time; train without a pre-filled cache, with a cache whose "
        f"update() stores nothing and that sets {REPLAY_SAFE_ATTR}=True, or with train.gradient_checkpointing=false"
    )


def checkpoint_blocks(model: nn.Module, enabled: bool = True) -> int:
    """Turn block-level gradient checkpointing on (or off) for every block of :func:`transformer_blocks`.

    Memory: instead of every intermediate activation of every block (attention scores, MLP hidden states, ...),
    training keeps one (B, T, d) input per block; the price is one extra forward pass of the blocks in the backward
    pass (about a third more compute). Unlike Hugging Face's ``model.activation_checkpointing_enable()`` this passes
    a KV cache through (prefix tuning keeps its prefixes there; see :data:`REPLAY_SAFE_ATTR`), needs no
    ``enable_input_require_grads()`` (non-reentrant checkpointing), and is a no-op in eval mode and under
    ``torch.no_grad()``, so validation and generation are untouched. Parameters and state dict do not change.

    Args:
        model: a GPT-2 or Llama-family causal LM (any method applied or not; applying one afterwards is fine too).
        enabled: True installs the wrapper (idempotent), False removes it (a no-op when absent).

    Returns:
        The number of blocks that are checkpointed afterwards (0 after ``enabled=False``).

    Raises:
        ValueError: ``enabled`` while Hugging Face's own gradient checkpointing is on (the two would nest).
    """
    if enabled and hf_gradient_checkpointing(model):
        raise ValueError("Hugging Face's gradient checkpointing is already on; call "
                         "model.activation_checkpointing_disable() first (train.gradient_checkpointing uses peftlab's "
                         "own, which keeps the KV cache)")
    blocks = transformer_blocks(model)
    for index, block in enumerate(blocks):
        current = block.__dict__.get("forward")
        if isinstance(current, CheckpointedForward):
            if not enabled:
                if current.previous is None:
                    del block.forward
                else:
                    block.forward = current.previous
        elif enabled:
            block.forward = CheckpointedForward(block, index, current)
    return blocks_checkpointed(model)


def blocks_checkpointed(model: nn.Module) -> int:
    """How many of the model's transformer blocks :func:`checkpoint_blocks` has wrapped."""
    return sum(isinstance(b.__dict__.get("forward"), CheckpointedForward) for b in transformer_blocks(model))
