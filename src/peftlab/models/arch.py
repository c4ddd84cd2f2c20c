"""Architecture facts: the one place that knows where things live in GPT-2 and Llama-style decoders.

Every method asks this module instead of hard-coding module names:

* GPT-2 (``GPT2LMHeadModel``): linear layers are ``transformers.pytorch_utils.Conv1D``, whose weight is stored
  transposed, ``(in, out)``; q, k and v are one fused ``attn.c_attn`` with out = 3 * d, split in that order;
  ``lm_head.weight`` is the input embedding ``transformer.wte.weight`` (tied).
* Llama family (Llama, SmolLM2, Mistral, Qwen2, ...): ``nn.Linear`` with weight ``(out, in)``;
  ``self_attn.{q,k,v,o}_proj`` (k/v are narrower under grouped-query attention: out = n_kv_heads * head_dim) and
  ``mlp.{gate,up,down}_proj``; SmolLM2 ties ``lm_head`` to ``model.embed_tokens``.

Canonical target names ``q, k, v, o, gate, up, down`` (plus ``all-linear``) mean the same thing on every family
(:mod:`peftlab.models.targets`, the one resolver, shared with the config-only :mod:`peftlab.models.shape`).
Block-level gradient checkpointing is in :mod:`peftlab.models.checkpointing`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.models.targets import (  # noqa: F401  re-exported: methods read the families from here
    ALL_LINEAR,
    CANONICAL_TARGETS,
    FAMILIES,
    FUSED_QKV_PARTS,
    OutputWidth,
    resolve,
    valid_names,
)

# Layers a weight-level method (LoRA, IA3, ...) can wrap: y = x W^T + b with W (out, in), or Conv1D's x W + b.
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)

# Set on the model by :func:`untie_output_head` so the fingerprint still describes the *base* model.
BASE_TIED_ATTR = "_peftlab_base_tied"

@dataclass(frozen=True)
class TargetModule(OutputWidth):
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


def trunk(model: nn.Module) -> nn.Module:
    """The decoder stack including the final norm (``model.base_model``); its output has ``last_hidden_state``."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise TypeError(f"{type(model).__name__} has no separate base model (expected a *ForCausalLM model)")
    return base


def _present(module: nn.Module | None, model: nn.Module, what: str) -> nn.Module:
    if module is None:
        raise TypeError(f"{type(model).__name__} has no {what}")
    return module


def output_head(model: nn.Module) -> nn.Module:
    """The LM head (``model.get_output_embeddings()``): hidden (B, T, d) -> logits (B, T, V)."""
    return _present(model.get_output_embeddings(), model, "output head")


def output_head_name(model: nn.Module) -> str:
    """Dotted module path of :func:`output_head` (``"lm_head"`` for GPT-2 and Llama)."""
    return module_name(model, output_head(model))


def input_embeddings(model: nn.Module) -> nn.Embedding:
    """The token embedding (``model.get_input_embeddings()``): ids (B, T) -> (B, T, d)."""
    return _present(model.get_input_embeddings(), model, "input embeddings")


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


@dataclass(frozen=True)
class _BuiltLinear:
    """A linear layer of a built model, as :func:`peftlab.models.targets.resolve` lists them."""

    name: str
    in_features: int
    out_features: int
    module: nn.Module


def resolve_targets(model: nn.Module, targets: list[str] | str, *, key: str = "target_modules") -> list[TargetModule]:
    """The linear layers (or output slices) that ``targets`` names, in model order.

    The rules (canonical names, ``all-linear``, module-name suffixes, one regex string) are
    :func:`peftlab.models.targets.resolve`'s, shared with the config-only
    :func:`peftlab.models.shape.resolve_target_shapes`.

    Raises:
        ConfigError: an item matches nothing (the message lists the valid names), the list is empty, or a module is
            targeted both whole and as a slice.
    """
    found = resolve(_linears(model), targets, key=key, model_type=str(model.config.model_type), family=family(model),
                    block_prefixes=_block_prefixes(model))
    return [TargetModule(lin.name, lin.module, lin.in_features, lin.out_features, isinstance(lin.module, Conv1D),
                         part, out_slice) for lin, part, out_slice in found]


def valid_target_names(model: nn.Module) -> str:
    """A sentence listing what :func:`resolve_targets` accepts for this model (for error messages)."""
    return valid_names(_linears(model), family(model))


def _linears(model: nn.Module) -> list[_BuiltLinear]:
    return [_BuiltLinear(name, *linear_features(m), m) for name, m in model.named_modules()
            if isinstance(m, LINEAR_TYPES)]


def _has_submodule(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _block_prefixes(model: nn.Module) -> list[str]:
    prefix = module_name(model, transformer_blocks(model))
    return [f"{prefix}.{i}" for i in range(len(transformer_blocks(model)))]


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

