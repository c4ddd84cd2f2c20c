"""The MAM adapter ("mix-and-match", He et al. 2022, Towards a Unified View of Parameter-Efficient Transfer Learning,
https://arxiv.org/abs/2110.04366): the unified view's best combination, prefix tuning on every attention layer and a
scaled parallel adapter on every feed-forward sub-layer, built from peftlab's two parts:

    attention:  K_l = [P_l^K ; X W_l^K],  V_l = [P_l^V ; X W_l^V]     # prefix tuning, P_l: (n_kv_heads, n, head_dim)
    FFN:        f'(x) = f(x) + s (act(x W_down^T + b_down) W_up^T + b_up)     # adapter, x: (B, T, d) -> (B, T, b)

The model is frozen; P (or P' and its MLP) and the FFN adapters train. At init the adapters add 0, so the model is
the prefix-tuned one. There is no merged form: the prefixes are extra attention positions (no weight change gives
softmax over [P ; X W]) and the adapter's non-linearity keeps it out of the FFN's weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftlab.methods.adapters.method import AdapterMethod, apply_adapters
from peftlab.methods.base import PeftMethod
from peftlab.methods.mam.config import MamConfig
from peftlab.methods.prefix_tuning.method import PREFIX_MODULE, PrefixTuningMethod, apply_prefix_tuning

PREFIX_KEY = PREFIX_MODULE + "."  # the prefix part's keys: its parameters' names in the model


class MamMethod(PeftMethod):
    """MAM applied to one model: ``prefix`` (:class:`PrefixTuningMethod`) and ``adapters`` (:class:`AdapterMethod`)
    on the same model, each doing what it does alone."""

    def __init__(self, model: nn.Module, config: MamConfig, prefix: PrefixTuningMethod,
                 adapters: AdapterMethod) -> None:
        self.model, self.config, self.prefix, self.adapters = model, config, prefix, adapters

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """``prefix_encoder.<prefix key>`` (``prompt_embeddings``, or ``embedding.weight`` and the MLP) and the
        adapters' ``<FFN path>.adapter.{down,up}.{weight,bias}``."""
        prefix = {PREFIX_KEY + k: p for k, p in self.prefix.trainable_parameters().items()}
        return {**prefix, **self.adapters.trainable_parameters()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Each part loads its own keys (the prefix folds or unfolds as prefix tuning does)."""
        self.prefix.load_adapter_state_dict({k.removeprefix(PREFIX_KEY): v for k, v in state.items()
                                             if k.startswith(PREFIX_KEY)})
        self.adapters.load_adapter_state_dict({k: v for k, v in state.items() if not k.startswith(PREFIX_KEY)})

    def prepare_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       labels: torch.Tensor | None = None) -> dict[str, Any]:
        """Prefix tuning's: the prefix cache and an attention mask with n leading ones."""
        return self.prefix.prepare_inputs(input_ids, attention_mask, labels)

    def after_training(self) -> None:
        """Fold the prefix MLP into P (``drop_mlp_after_training``); the adapters stay."""
        self.prefix.after_training()

    def describe(self) -> dict[str, Any]:
        return {"prefix": self.prefix.describe(), "adapter": self.adapters.describe()}


def apply_mam(model: nn.Module, config: MamConfig) -> MamMethod:
    """Freeze ``model``, add the prefixes (``model.prefix_encoder``) and wrap every FFN in a scaled parallel adapter.

    Returns:
        The :class:`MamMethod`; use its ``prepare_inputs`` for every forward pass.

    Raises:
        ValueError: prefix tuning or adapters are already on ``model``, or Hugging Face's gradient checkpointing is
            on (it drops the prefix cache).
    """
    prefix = apply_prefix_tuning(model, config.prefix_config())
    adapters = apply_adapters(model, config.adapter_config())  # freezes the whole model first, the prefix too
    for p in prefix.trainable_parameters().values():
        p.requires_grad_(True)
    return MamMethod(model, config, prefix, adapters)
