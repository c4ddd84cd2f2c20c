"""Prefix tuning: Prefix-Tuning: Optimizing Continuous Prompts for Generation (Li & Liang 2021,
https://arxiv.org/abs/2101.00190).

Every attention layer l gets n trainable key and value vectors that every real token attends to, as if n virtual
tokens preceded the input in that layer; the model itself stays frozen:

    K_l = [P_l^K ; X W_l^K],  V_l = [P_l^V ; X W_l^V]      P_l^K, P_l^V: (n_kv_heads, n, head_dim)

All prefixes are one matrix P (n, L * 2 * n_kv_heads * head_dim), laid out as PEFT lays out its
``prompt_embeddings`` (layer-major, then key/value, then head, then head_dim), so a folded adapter and PEFT's
adapter file hold the same tensor. With ``reparametrize`` (Li & Liang's stabilising trick, PEFT's
``prefix_projection``) P is not trained directly:

    P = W_2 tanh(W_1 P' + b_1) + b_2      P': (n, k), W_1: (h, k), W_2: (L * 2 * k, h),  k = n_kv_heads * head_dim

(k is the key/value width, as in PEFT: the hidden size for GPT-2, narrower under grouped-query attention.) After
training :meth:`PrefixTuningMethod.fold` computes P once and drops P' and the MLP.

The prefixes enter through the KV cache: :meth:`PrefixTuningMethod.prepare_inputs` returns a fresh
:class:`PrefixCache` holding them, an attention mask with n ones prepended (B, n + T), and unchanged
``input_ids``/labels (B, T). Positions: with n entries already in the cache, Hugging Face models number the real
tokens n, n+1, ... when no ``position_ids`` are passed (training), and the generate loop's ``cumsum(mask) - 1`` over
the extended mask gives the same numbers, as does PEFT (it adds n to the position ids it is given).

Gradient checkpointing (``train.gradient_checkpointing``, :func:`peftlab.models.checkpointing.checkpoint_blocks`)
runs each block's forward a second time in the backward pass, so each layer calls ``cache.update(k, v, layer)``
twice. A storing cache would then hold the real keys twice; the training-time cache is stateless instead: it holds
only the prefixes and ``update`` returns ``[prefix ; k]`` without storing, so a replay gives the same tensors, while
``get_seq_length``/``get_mask_sizes`` still count the n prefix positions. Generation (eval mode or no autograd)
gets the storing cache, which the decode steps extend. Hugging Face's own checkpointing
(``model.activation_checkpointing_enable()``, formerly ``gradient_checkpointing_enable()``) is refused: it drops
the cache inside checkpointed layers (``GradientCheckpointingLayer`` sets ``cache=None``) while the mask
still counts n + T keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from peftlab.methods.base import PeftMethod, freeze_all
from peftlab.methods.prefix_tuning.config import PrefixTuningConfig
from peftlab.models.checkpointing import hf_gradient_checkpointing

# Name of the prefix module on the model (moves with model.to()).
PREFIX_MODULE = "prefix_encoder"
# Key of the folded P (n, L * 2 * k) in the adapter file; PEFT saves its prefix under the same key and layout.
PROMPT_KEY = "prompt_embeddings"


@dataclass(frozen=True)
class KVShape:
    """The shape of a decoder's key/value cache: L layers of (n_kv_heads, T, head_dim) keys and values."""

    n_layers: int
    n_kv_heads: int
    head_dim: int

    @property
    def kv_dim(self) -> int:
        """k = n_kv_heads * head_dim: width of one layer's keys (or values) per position."""
        return self.n_kv_heads * self.head_dim

    @property
    def flat_dim(self) -> int:
        """Width of P: L * 2 * k (keys and values of every layer)."""
        return self.n_layers * 2 * self.kv_dim


def kv_shape(model: nn.Module) -> KVShape:
    """Layers, key/value heads and head size from the model's config (GPT-2's ``n_head`` maps to
    ``num_attention_heads``; Llama-style configs add ``num_key_value_heads`` and ``head_dim``)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KVShape(n_layers=config.num_hidden_layers, n_kv_heads=kv_heads, head_dim=head_dim)


class PrefixEncoder(nn.Module):
    """Holds P (n, L * 2 * k) directly (``prompt_embeddings``) or as P' (``embedding``, (n, k)) and the MLP
    (``transform``); parameter names match PEFT's ``PrefixEncoder`` (and its saved ``prompt_embeddings``).

    Initialisation as PEFT's: P' or P ~ N(0, 1) (``nn.Embedding``'s default), the MLP with ``nn.Linear``'s default.
    """

    def __init__(self, n_tokens: int, shape: KVShape, hidden_size: int, reparametrize: bool) -> None:
        super().__init__()
        self.shape = shape
        if reparametrize:
            self.embedding = nn.Embedding(n_tokens, shape.kv_dim)
            self.transform = nn.Sequential(
                nn.Linear(shape.kv_dim, hidden_size), nn.Tanh(), nn.Linear(hidden_size, shape.flat_dim)
            )
        else:
            self.prompt_embeddings = nn.Parameter(torch.randn(n_tokens, shape.flat_dim))

    @property
    def folded(self) -> bool:
        """True when P is stored directly (no MLP)."""
        return not hasattr(self, "transform")

    def forward(self) -> torch.Tensor:
        """P: (n, L * 2 * k)."""
        if self.folded:
            return self.prompt_embeddings
        return self.transform(self.embedding.weight)  # (n, k) -> (n, h) -> (n, L * 2 * k)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace P' and the MLP by the P they compute (no-op when already folded)."""
        if self.folded:
            return
        prefix = self.forward().detach().clone()
        del self.embedding, self.transform
        self.prompt_embeddings = nn.Parameter(prefix)


class PrefixCache(DynamicCache):
    """A ``DynamicCache`` pre-filled with the prefixes, cast to the dtype of the keys the model writes.

    So fp32 prefixes work under bf16 autocast, where ``prepare_inputs`` may run outside the autocast region.

    With ``stateless`` set (training), ``update`` returns ``([P^K ; k], [P^V ; v])`` and stores nothing: calling it
    again for the same layer (a gradient-checkpointing replay) gives the same result, and the cache keeps reporting
    n positions to the mask code. Without it (generation), ``update`` appends as a ``DynamicCache`` does.
    """

    stateless: bool = False

    @property
    def replay_safe(self) -> bool:
        """What :func:`peftlab.models.checkpointing.checkpoint_blocks` checks before a block replays its forward."""
        return self.stateless

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if self.stateless:
            if layer is None or not layer.is_initialized:
                raise ValueError(f"the prefix cache holds no prefix for layer {layer_idx}")
            # (B, H, n, hd) + (B, H, T, hd) -> (B, H, n + T, hd); cast a copy, never the stored prefix.
            return (torch.cat([layer.keys.to(key_states.dtype), key_states], dim=-2),
                    torch.cat([layer.values.to(value_states.dtype), value_states], dim=-2))
        if layer is not None and layer.is_initialized and layer.keys.dtype != key_states.dtype:
            layer.keys, layer.values = layer.keys.to(key_states.dtype), layer.values.to(value_states.dtype)
            layer.dtype = key_states.dtype
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


HF_CHECKPOINTING_ERROR = (
    "prefix tuning does not work with Hugging Face's gradient checkpointing (model.activation_checkpointing_enable() "
    "or gradient_checkpointing_enable()): it drops the KV cache, which holds the prefixes, inside checkpointed "
    "layers; call model.activation_checkpointing_disable() and use train.gradient_checkpointing=true "
    "(peftlab.models.checkpointing.checkpoint_blocks), which keeps the cache"
)


class PrefixTuningMethod(PeftMethod):
    """Prefix tuning applied to one model; the prefixes live in ``model.prefix_encoder``."""

    def __init__(self, model: nn.Module, config: PrefixTuningConfig, shape: KVShape) -> None:
        self.model = model
        self.config = config
        self.shape = shape

    @property
    def encoder(self) -> PrefixEncoder:
        return getattr(self.model, PREFIX_MODULE)

    @property
    def folded(self) -> bool:
        return self.encoder.folded

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """``prompt_embeddings`` (folded or ``reparametrize=False``), else ``embedding.weight`` and
        ``transform.{0,2}.{weight,bias}``."""
        return dict(self.encoder.named_parameters())

    def prefix_cache(self, batch_size: int, stateless: bool = False) -> PrefixCache:
        """A fresh cache holding each layer's prefix keys and values, each (B, n_kv_heads, n, head_dim).

        Args:
            batch_size: B.
            stateless: True: ``update`` returns prefix + new keys without storing them (training, safe under
                gradient checkpointing); False: the model appends the real tokens' keys (generation).
        """
        n, s = self.config.n_tokens, self.shape
        prefix = self.encoder()  # (n, L * 2 * k)
        # (n, L*2, H, hd) -> (L*2, H, n, hd): row 2l holds layer l's keys, row 2l + 1 its values.
        per_layer = prefix.view(n, s.n_layers * 2, s.n_kv_heads, s.head_dim).permute(1, 2, 0, 3)
        cache = PrefixCache(config=self.model.config)
        for layer in range(s.n_layers):
            keys = per_layer[2 * layer].unsqueeze(0).expand(batch_size, -1, -1, -1)  # (B, H, n, hd)
            values = per_layer[2 * layer + 1].unsqueeze(0).expand(batch_size, -1, -1, -1)
            cache.update(keys, values, layer)
        cache.stateless = stateless
        return cache

    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """``input_ids`` (B, T), ``attention_mask`` (B, n+T) with n leading ones, labels (B, T) unchanged, and
        ``cache``: a fresh :class:`PrefixCache` of length n (the keyword transformers >= 5.24 reads; it was
        ``past_key_values`` before).

        The cache is stateless when the model trains (training mode with autograd on: the only case in which
        :func:`~peftlab.models.checkpointing.checkpoint_blocks` replays blocks), a storing one otherwise, which
        generation extends token by token.
        """
        training = self.model.training and torch.is_grad_enabled()
        if training and hf_gradient_checkpointing(self.model):
            raise ValueError(HF_CHECKPOINTING_ERROR)
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ones = attention_mask.new_ones(batch, self.config.n_tokens)
        out: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.cat([ones, attention_mask], dim=1),
            "cache": self.prefix_cache(batch, stateless=training),
        }
        if labels is not None:
            out["labels"] = labels
        return out

    def fold(self) -> None:
        """Compute P = MLP(P') once and keep only P (the adapter then holds ``prompt_embeddings`` only).

        Call after training: an optimizer built before folding still holds the dropped parameters.
        """
        self.encoder.fold()
        self.encoder.requires_grad_(True)

    def after_training(self) -> None:
        """Fold when ``config.drop_mlp_after_training`` (for the runner to call once training is over)."""
        if self.config.drop_mlp_after_training:
            self.fold()

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a folded adapter (``prompt_embeddings``) or an unfolded one (P' and the MLP) into either form."""
        if set(state) == {PROMPT_KEY} and not self.folded:
            self.fold()  # the file holds P only: drop our MLP, then copy P in
        elif self.folded and state and PROMPT_KEY not in state:
            state = {PROMPT_KEY: self._fold_state(state)}
        super().load_adapter_state_dict(state)

    def _fold_state(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """P computed from a saved unfolded state (P' and the MLP)."""
        encoder = PrefixEncoder(self.config.n_tokens, self.shape, self.config.hidden_size, reparametrize=True)
        try:
            encoder.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"adapter weights do not match this model's prefix encoder: {err}") from err
        with torch.no_grad():
            return encoder()

    def describe(self) -> dict[str, Any]:
        s = self.shape
        return {"n_tokens": self.config.n_tokens, "reparametrize": self.config.reparametrize,
                "hidden_size": self.config.hidden_size if self.config.reparametrize else None,
                "folded": self.folded, "n_layers": s.n_layers, "n_kv_heads": s.n_kv_heads, "head_dim": s.head_dim}


def apply_prefix_tuning(model: nn.Module, config: PrefixTuningConfig) -> PrefixTuningMethod:
    """Freeze ``model`` and register the prefixes as ``model.prefix_encoder``.

    Args:
        model: a Hugging Face causal LM whose attention reads a KV ``cache`` (GPT-2, Llama family).
        config: the options.

    Returns:
        The :class:`PrefixTuningMethod`; use its ``prepare_inputs`` for every forward pass.
    """
    if hasattr(model, PREFIX_MODULE):
        raise ValueError(f"the model already has {PREFIX_MODULE!r}: prefix tuning is applied once per model")
    if hf_gradient_checkpointing(model):
        raise ValueError(HF_CHECKPOINTING_ERROR)
    freeze_all(model)
    shape = kv_shape(model)
    reference = next(model.parameters())
    encoder = PrefixEncoder(config.n_tokens, shape, config.hidden_size, config.reparametrize)
    model.add_module(PREFIX_MODULE, encoder.to(reference.device))  # float32, whatever the base dtype
    return PrefixTuningMethod(model, config, shape)
