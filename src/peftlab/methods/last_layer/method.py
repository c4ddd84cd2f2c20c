"""Last-layer tuning: train the output head only (a linear probe on frozen features;
Kumar et al. 2022, https://arxiv.org/abs/2202.10054, compare it with full fine-tuning).

    logits = h W_head^T        h: (B, T, d) from the frozen trunk,  W_head: (V, d) trainable

GPT-2 and SmolLM2 tie W_head to the input embedding E. ``head=untied`` (default) gives the head its own copy
W_head = E.clone() and sets ``config.tie_word_embeddings = False`` so nothing re-ties it; E stays frozen, so only
the output side learns. ``head=tied`` trains the shared matrix, which changes the inputs too. Loading an adapter
onto a fresh base is ``apply`` (which unties again) followed by ``load_adapter_state_dict``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftlab.methods.base import PeftMethod, freeze_all
from peftlab.methods.last_layer.config import LastLayerConfig
from peftlab.models.arch import is_tied, output_head, output_head_name, untie_output_head


class LastLayerMethod(PeftMethod):
    """The output head trains; ``head`` is the effective mode and ``was_tied`` what the base model did."""

    def __init__(self, model: nn.Module, config: LastLayerConfig, head: str, was_tied: bool) -> None:
        self.model = model
        self.config = config
        self.head = head
        self.was_tied = was_tied
        self._prefix = output_head_name(model)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """``lm_head.weight`` (V, d), plus ``lm_head.bias`` when the head has one."""
        return {f"{self._prefix}.{name}": p for name, p in output_head(self.model).named_parameters()}

    def frozen_trunk(self) -> bool:
        """True with an untied head; a tied head is also the input embedding, so training it changes the trunk."""
        return self.head == "untied"

    def describe(self) -> dict[str, Any]:
        return {"head": self.head, "was_tied": self.was_tied}


def apply_last_layer(model: nn.Module, config: LastLayerConfig) -> LastLayerMethod:
    """Freeze ``model``, untie the head when asked, and unfreeze the head.

    Args:
        model: a causal LM with an output head.
        config: ``head`` decides what happens when the head shares the input embedding matrix.

    Returns:
        The :class:`LastLayerMethod`; at this point the logits equal the base model's.
    """
    freeze_all(model)
    was_tied = is_tied(model)
    if was_tied and config.head == "untied":
        untie_output_head(model)
    for p in output_head(model).parameters():
        p.requires_grad_(True)
    head = "tied" if is_tied(model) else "untied"
    return LastLayerMethod(model, config, head, was_tied)
