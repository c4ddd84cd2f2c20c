"""Architecture facts: the one place that knows where things live in GPT-2 and Llama-style decoders.

Every method asks this module instead of hard-coding module names:

* GPT-2 (``GPT2LMHeadModel``): linear layers are ``transformers.pytorch_utils.Conv1D``, whose weight is stored
  transposed, ``(in, out)``; q, k and v are one fused ``attn.c_attn`` with out = 3 * d, split in that order;
  ``lm_head.weight`` is the input embedding ``transformer.wte.weight`` (tied).
* Llama family (Llama, SmolLM2, Mistral, Qwen2, ...): ``nn.Linear`` with weight ``(out, in)``;
  ``self_attn.{q,k,v,o}_proj`` (k/v are narrower under grouped-query attention: out = n_kv_heads * head_dim) and
  ``mlp.{gate,up,down}_proj``; SmolLM2 ties ``lm_head`` to ``model.embed_tokens``.

Canonical target names ``q, k, v, o, gate, up, down`` (plus ``all-linear``) mean the same thing on every family,
so one config (``method.target_modules=[q, v]``) runs on both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache
from transformers.pytorch_utils import Conv1D

from peftlab.config import ConfigError

# Layers a weight-level method (LoRA, IA3, ...) can wrap: y = x W^T + b with W (out, in), or Conv1D's x W + b.
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)

CANONICAL_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
ALL_LINEAR = "all-linear"

# family -> canonical name -> (module path inside one transformer block, index of the output slice or None).
# GPT-2's fused c_attn computes [q | k | v] along its output columns, each d = hidden_size wide.
FAMILIES: dict[str, dict[str, tuple[str, int | None]]] = {
    "gpt2": {
        "q": ("attn.c_attn", 0),
        "k": ("attn.c_attn", 1),
        "v": ("attn.c_attn", 2),
        "o": ("attn.c_proj", None),
        "up": ("mlp.c_fc", None),
        "down": ("mlp.c_proj", None),
    },
    "llama": {
        "q": ("self_attn.q_proj", None),
        "k": ("self_attn.k_proj", None),
        "v": ("self_attn.v_proj", None),
        "o": ("self_attn.o_proj", None),
        "gate": ("mlp.gate_proj", None),
        "up": ("mlp.up_proj", None),
        "down": ("mlp.down_proj", None),
    },
}
FUSED_QKV_PARTS = 3

# Set on the model by :func:`untie_output_head` so the fingerprint still describes the *base* model.
BASE_TIED_ATTR = "_peftlab_base_tied"

_REGEX_CHARS = set("*+?[](){}|^$\\")


@dataclass(frozen=True)
class TargetModule:
    """One linear layer (or an output slice of one) chosen by :func:`resolve_targets`.

    Attributes:
        name: dotted module path in the model, e.g. ``"transformer.h.0.attn.c_attn"``.
        module: the ``nn.Linear`` or ``Conv1D`` itself.
        in_features: input width of the whole module.
        out_features: output width of the whole module.
        fan_in_fan_out: True for ``Conv1D`` (weight stored ``(in, out)``), False for ``nn.Linear`` (``(out, in)``).
        part: canonical slice name (``"q"``, ``"k"``, ``"v"``) when only some output columns are targeted.
        out_slice: ``(start, stop)`` output columns of ``part``; None for the whole module.
    """

    name: str
    module: nn.Module
    in_features: int
    out_features: int
    fan_in_fan_out: bool
    part: str | None = None
    out_slice: tuple[int, int] | None = None

    @property
    def out_size(self) -> int:
        """Width of the targeted output: the slice's, or the whole module's."""
        if self.out_slice is None:
            return self.out_features
        return self.out_slice[1] - self.out_slice[0]


def trunk(model: nn.Module) -> nn.Module:
    """The decoder stack including the final norm (``model.base_model``); its output has ``last_hidden_state``."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise TypeError(f"{type(model).__name__} has no separate base model (expected a *ForCausalLM model)")
    return base


def output_head(model: nn.Module) -> nn.Module:
    """The LM head (``model.get_output_embeddings()``): hidden (B, T, d) -> logits (B, T, V)."""
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output head")
    return head


def output_head_name(model: nn.Module) -> str:
    """Dotted module path of :func:`output_head` (``"lm_head"`` for GPT-2 and Llama)."""
    return module_name(model, output_head(model))


def input_embeddings(model: nn.Module) -> nn.Embedding:
    """The token embedding (``model.get_input_embeddings()``): ids (B, T) -> (B, T, d)."""
    emb = model.get_input_embeddings()
    if emb is None:
        raise TypeError(f"{type(model).__name__} has no input embeddings")
    return emb


def is_tied(model: nn.Module) -> bool:
    """True when the head's weight *is* the input embedding matrix (same storage, so training one trains both)."""
    head_w = getattr(output_head(model), "weight", None)
    emb_w = input_embeddings(model).weight
    if head_w is None:
        return False
    return head_w is emb_w or (head_w.shape == emb_w.shape and head_w.data_ptr() == emb_w.data_ptr())


def untie_output_head(model: nn.Module) -> nn.Parameter:
    """Give the head its own copy of the embedding matrix; nothing re-ties it afterwards.

    ``config.tie_word_embeddings`` is set False (``tie_weights()`` re-ties only when it is True) and the head is
    removed from transformers' ``all_tied_weights_keys`` (which ``save_pretrained`` uses to drop duplicates).
    The model remembers that its base was tied, so :func:`arch_fingerprint` is unchanged.

    Returns:
        The head's new weight parameter (V, d), a copy of the embedding, with the embedding's requires_grad.
    """
    if not is_tied(model):
        return output_head(model).weight
    head = output_head(model)
    emb_w = input_embeddings(model).weight
    head.weight = nn.Parameter(emb_w.detach().clone(), requires_grad=emb_w.requires_grad)
    model.config.tie_word_embeddings = False
    tied_keys = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied_keys, dict):
        tied_keys.pop(f"{output_head_name(model)}.weight", None)
    setattr(model, BASE_TIED_ATTR, True)
    return head.weight


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (GPT-2 ``transformer.h``, Llama ``model.layers``)."""
    body = trunk(model)
    for attr in ("h", "layers", "blocks", "block"):
        blocks = getattr(body, attr, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for module in body.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise TypeError(f"cannot find the transformer blocks of {type(model).__name__}")


def module_name(model: nn.Module, target: nn.Module) -> str:
    """Dotted path of ``target`` inside ``model``."""
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(model).__name__}")


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or GPT-2 ``Conv1D``."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]  # Conv1D weight: (in, out)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise TypeError(f"{type(module).__name__} is not a linear layer (nn.Linear or Conv1D)")


def family(model: nn.Module) -> str | None:
    """The module-naming family (``"gpt2"`` or ``"llama"``) whose canonical paths all exist, or None."""
    block = transformer_blocks(model)[0]
    for fam, table in FAMILIES.items():
        paths = {path for path, _ in table.values()}
        if all(_has_submodule(block, p) for p in paths):
            return fam
    return None


def arch_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Identity of the base model that a saved adapter records and loading compares.

    Only structure, never weights: model_type, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads,
    intermediate_size and tied (whether the *base* ties head and embeddings; untying by a method does not change it).
    """
    cfg = model.config
    emb = input_embeddings(model)
    hidden = emb.embedding_dim
    num_heads = int(cfg.num_attention_heads)
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    return {
        "model_type": str(cfg.model_type),
        "vocab_size": int(emb.num_embeddings),
        "hidden_size": int(hidden),
        "num_layers": len(transformer_blocks(model)),
        "num_heads": num_heads,
        "num_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or num_heads),
        "intermediate_size": int(inter),
        "tied": bool(getattr(model, BASE_TIED_ATTR, is_tied(model))),
    }


def resolve_targets(model: nn.Module, targets: list[str] | str, *, key: str = "target_modules") -> list[TargetModule]:
    """The linear layers (or output slices) that ``targets`` names, in model order.

    Args:
        model: a GPT-2 or Llama-family causal LM.
        targets: a list whose items are canonical names (``q k v o gate up down``), ``"all-linear"`` (every linear
            layer inside the transformer blocks; not the LM head) or exact module-name suffixes (``"c_attn"``,
            ``"mlp.c_proj"``, ``"lm_head"``); or one string. A string containing a regex character
            (``* + ? [ ] ( ) { } | ^ $ \\``) is a regex matched with ``re.fullmatch`` against full module names;
            any other string is a one-item list. On GPT-2, ``q``/``k``/``v`` are output slices of the fused
            ``c_attn``; ``"c_attn"`` (or a regex) targets the whole module, as PEFT does.
        key: config key named in error messages.

    Returns:
        One :class:`TargetModule` per targeted module or slice.

    Raises:
        ConfigError: an item matches nothing (the message lists the valid names), the list is empty, or a module is
            targeted both whole and as a slice.
    """
    if isinstance(targets, str):
        if _REGEX_CHARS & set(targets):
            found = _match_regex(model, targets, key)
            return _finish(model, found, key)
        targets = [targets]
    if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"{key}: expected a non-empty list of module names, got {targets!r}")
    found: dict[tuple[str, str | None], TargetModule] = {}
    for item in targets:
        matches = _match_item(model, item)
        if not matches:
            raise ConfigError(f"{key}: {item!r} matches no linear layer of this {model.config.model_type} model; "
                              f"{valid_target_names(model)}")
        for t in matches:
            found[(t.name, t.part)] = t
    return _finish(model, found, key)


def valid_target_names(model: nn.Module) -> str:
    """A sentence listing what :func:`resolve_targets` accepts for this model (for error messages)."""
    fam = family(model)
    canonical = list(FAMILIES[fam]) if fam else []
    leaves = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LINEAR_TYPES)})
    return (f"valid: canonical names {', '.join(canonical + [ALL_LINEAR]) if canonical else ALL_LINEAR}, "
            f"module-name suffixes such as {', '.join(leaves)}, or a regex string over full module names")


def _has_submodule(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _target(name: str, module: nn.Module, part: str | None = None, index: int | None = None) -> TargetModule:
    d_in, d_out = linear_features(module)
    out_slice = None
    if index is not None:
        width = d_out // FUSED_QKV_PARTS
        out_slice = (index * width, (index + 1) * width)
    return TargetModule(name, module, d_in, d_out, isinstance(module, Conv1D), part, out_slice)


def _block_prefixes(model: nn.Module) -> list[str]:
    prefix = module_name(model, transformer_blocks(model))
    return [f"{prefix}.{i}" for i in range(len(transformer_blocks(model)))]


def _match_item(model: nn.Module, item: str) -> list[TargetModule]:
    blocks = transformer_blocks(model)
    if item == ALL_LINEAR:
        block_names = {module_name(model, b) for b in blocks}
        return [_target(name, m) for name, m in model.named_modules()
                if isinstance(m, LINEAR_TYPES) and any(name.startswith(b + ".") for b in block_names)]
    fam = family(model)
    if item in CANONICAL_TARGETS:
        if fam is None or item not in FAMILIES[fam]:
            return []
        path, index = FAMILIES[fam][item]
        part = item if index is not None else None
        return [_target(f"{prefix}.{path}", block.get_submodule(path), part, index)
                for prefix, block in zip(_block_prefixes(model), blocks, strict=True)]
    return [_target(name, m) for name, m in model.named_modules()
            if isinstance(m, LINEAR_TYPES) and (name == item or name.endswith("." + item))]


def _match_regex(model: nn.Module, pattern: str, key: str) -> dict[tuple[str, str | None], TargetModule]:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{key}: {pattern!r} is not a valid regex: {exc}") from exc
    found = {(name, None): _target(name, m) for name, m in model.named_modules()
             if isinstance(m, LINEAR_TYPES) and regex.fullmatch(name)}
    if not found:
        raise ConfigError(f"{key}: regex {pattern!r} fully matches no linear layer's name "
                          f"(e.g. {_block_prefixes(model)[0]}...); {valid_target_names(model)}")
    return found


def _finish(model: nn.Module, found: dict[tuple[str, str | None], TargetModule], key: str) -> list[TargetModule]:
    whole = {name for name, part in found if part is None}
    overlap = sorted({name for name, part in found if part is not None and name in whole})
    if overlap:
        raise ConfigError(f"{key}: {overlap[0]} is targeted both whole and as q/k/v slices; choose one")
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(found.values(), key=lambda t: (order[t.name], t.out_slice or (0, 0)))


# Attribute names of the norm after the last block on the trunk: GPT-2 ``ln_f``, Llama/Mistral/Qwen2 ``norm``,
# OPT ``final_layer_norm``, Phi ``final_layernorm``.
FINAL_NORM_ATTRS: tuple[str, ...] = ("ln_f", "norm", "final_layer_norm", "final_layernorm")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last transformer block (GPT-2 ``transformer.ln_f``, Llama ``model.norm``)."""
    body = trunk(model)
    for attr in FINAL_NORM_ATTRS:
        norm = getattr(body, attr, None)
        if isinstance(norm, nn.Module):
            return norm
    raise TypeError(f"cannot find the final norm of {type(model).__name__} (looked for {', '.join(FINAL_NORM_ATTRS)})")


# family -> sub-layer -> module path inside one block, for the two sub-layers whose outputs the block adds to the
# residual stream: "attn", the attention module (normed hidden states (B, T, d) -> tuple whose first item is
# (B, T, d)), and "ffn", the feed-forward module ((B, T, d) -> (B, T, d)).
SUBLAYERS: dict[str, dict[str, str]] = {
    "gpt2": {"attn": "attn", "ffn": "mlp"},
    "llama": {"attn": "self_attn", "ffn": "mlp"},
}


def sublayer_names(model: nn.Module, kind: str) -> list[str]:
    """Dotted paths of one sub-layer kind (``"attn"`` or ``"ffn"``, see :data:`SUBLAYERS`) in every block, in order.

    Raises:
        TypeError: the model's block layout is not a known family.
        ValueError: ``kind`` is not a sub-layer kind.
    """
    fam = family(model)
    if fam is None or fam not in SUBLAYERS:
        raise TypeError(f"the blocks of {type(model).__name__} have an unknown layout; "
                        f"sub-layers are known for {', '.join(SUBLAYERS)}")
    if kind not in SUBLAYERS[fam]:
        raise ValueError(f"unknown sub-layer {kind!r}; choose one of {', '.join(SUBLAYERS[fam])}")
    return [f"{prefix}.{SUBLAYERS[fam][kind]}" for prefix in _block_prefixes(model)]


# ---- block-level gradient checkpointing ----------------------------------------------------------------------------
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
