"""Last-N-blocks tuning: train the top ``n_blocks`` transformer blocks, freeze everything below (Lee et al. 2019,
"What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning", https://arxiv.org/abs/1911.03090).

    h_L = norm(block_L(... block_{L-N+1}(h_{L-N}) ...))       h_{L-N}: (B, T, d) from the frozen lower blocks
    logits = h_L W_head^T                                      trainable: blocks L-N+1..L, norm, optionally W_head

The frozen part computes no weight gradients, and backpropagation stops at block L-N+1. ``head`` follows
last-layer's rules (last-layer tuning is the limit n_blocks=0, final_norm=false, head=untied): ``untied`` trains a copy
of tied embeddings as the head, ``tied`` trains the shared matrix, ``none`` leaves the head frozen.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftlab.config import ConfigError
from peftlab.methods.base import PeftMethod, freeze_all
from peftlab.methods.last_blocks.config import LastBlocksConfig
from peftlab.models.arch import final_norm, is_tied, output_head, transformer_blocks, untie_output_head


class LastBlocksMethod(PeftMethod):
    """The top blocks (and the final norm / head as configured) train; ``head`` is the effective head mode."""

    def __init__(self, model: nn.Module, config: LastBlocksConfig, trained: list[nn.Module], head: str,
                 was_tied: bool) -> None:
        self.model = model
        self.config = config
        self.trained = trained
        self.head = head
        self.was_tied = was_tied

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Model parameter names in model order (e.g. ``model.layers.1.mlp.up_proj.weight``, ``model.norm.weight``);
        a head tied to the embeddings appears once, under the embedding's name."""
        chosen = {id(p) for module in self.trained for p in module.parameters()}
        return {name: p for name, p in self.model.named_parameters() if id(p) in chosen}

    def frozen_blocks(self) -> int:
        """The blocks below the trained ones, L - n_blocks; 0 when the head trains as the tied input embedding (the
        inputs of every block then change)."""
        if self.head == "tied":
            return 0
        return len(transformer_blocks(self.model)) - self.config.n_blocks

    def describe(self) -> dict[str, Any]:
        n_layers = len(transformer_blocks(self.model))
        return {"n_blocks": self.config.n_blocks, "first_block": n_layers - self.config.n_blocks,
                "final_norm": self.config.final_norm, "head": self.head, "was_tied": self.was_tied}


def apply_last_blocks(model: nn.Module, config: LastBlocksConfig) -> LastBlocksMethod:
    """Freeze ``model``, then unfreeze the top ``config.n_blocks`` blocks, the final norm and the head as asked.

    Args:
        model: a GPT-2 or Llama-family causal LM.
        config: how many blocks, and whether the final norm and the head train.

    Returns:
        The :class:`LastBlocksMethod`; the model's outputs are unchanged (untying copies the matrix).

    Raises:
        ConfigError: ``n_blocks`` exceeds the model's number of blocks (the message gives the valid range).
    """
    blocks = transformer_blocks(model)
    if config.n_blocks > len(blocks):
        raise ConfigError(f"method.n_blocks: {config.n_blocks} is outside 1..{len(blocks)}; this "
                          f"{model.config.model_type} model has {len(blocks)} transformer blocks")
    freeze_all(model)
    was_tied = is_tied(model)
    if was_tied and config.head == "untied":
        untie_output_head(model)
    trained: list[nn.Module] = list(blocks[len(blocks) - config.n_blocks:])
    if config.final_norm:
        trained.append(final_norm(model))
    head = "none"
    if config.head != "none":
        trained.append(output_head(model))
        head = "tied" if is_tied(model) else "untied"
    for module in trained:
        for p in module.parameters():
            p.requires_grad_(True)
    return LastBlocksMethod(model, config, trained, head, was_tied)
