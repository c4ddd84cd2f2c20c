"""Soft prompt tuning: The Power of Scale for Parameter-Efficient Prompt Tuning (Lester et al. 2021,
https://arxiv.org/abs/2104.08691).

n trainable vectors P (n, d) are prepended to the token embeddings; the model itself stays frozen:

    h_0 = [P ; E[x]]      P: (n, d),  E[x]: (B, T, d)  ->  h_0: (B, n + T, d)

The virtual tokens go before everything, padding included (as PEFT does), so with right padding the real tokens
keep contiguous positions n..n+T'-1; the attention mask gets n ones in front and the labels n ``-100``.

Initialisation (torch's global RNG, so ``torch.manual_seed`` before ``apply`` makes it reproducible):

* ``random``: N(0, s^2), s = std of the embedding matrix (PEFT uses N(0, 1), far larger than real embeddings);
* ``vocab``: rows of the embedding matrix at token ids drawn uniformly from [0, V) (PEFT's SAMPLE_VOCAB);
* ``text``: rows at ``config.init_token_ids``, repeated or cut to n (PEFT's TEXT). The method has no tokenizer:
  the runner sets ``config.init_token_ids = tokenizer(config.init_text)["input_ids"]`` before ``apply``.

Generation: call :meth:`PromptTuningMethod.prepare_inputs` for the prefill step only, then feed plain
``input_ids`` with the KV cache (the prompt's keys and values are already cached) and an attention mask that
keeps the n leading ones; position ids from the cumulative sum of that mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftlab.config import ConfigError
from peftlab.methods.base import PeftMethod, freeze_all
from peftlab.methods.prompt_tuning.config import PromptTuningConfig
from peftlab.models.arch import input_embeddings

# Name of the prompt parameter on the model (moves with model.to()) and its key in the adapter file (as PEFT's).
PROMPT_PARAM = "prompt_embeddings"


class PromptTuningMethod(PeftMethod):
    """Soft prompt applied to one model; the prompt is ``model.prompt_embeddings`` (n, d), float32."""

    def __init__(self, model: nn.Module, config: PromptTuningConfig, init_token_ids: list[int] | None) -> None:
        self.model = model
        self.config = config
        self.init_token_ids = init_token_ids

    @property
    def prompt(self) -> nn.Parameter:
        return getattr(self.model, PROMPT_PARAM)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {PROMPT_PARAM: self.prompt}

    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Prepend the virtual tokens: ``inputs_embeds`` (B, n+T, d), ``attention_mask`` (B, n+T), labels (B, n+T)."""
        tokens = input_embeddings(self.model)(input_ids)  # (B, T, d)
        batch, n = input_ids.shape[0], self.config.n_tokens
        prompt = self.prompt.to(tokens.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, n, d)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ones = attention_mask.new_ones(batch, n)
        out = {
            "inputs_embeds": torch.cat([prompt, tokens], dim=1),
            "attention_mask": torch.cat([ones, attention_mask], dim=1),
        }
        if labels is not None:
            out["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        return out

    def describe(self) -> dict[str, Any]:
        return {"n_tokens": self.config.n_tokens, "init": self.config.init, "init_token_ids": self.init_token_ids}


def _initial_prompt(embedding: nn.Embedding, config: PromptTuningConfig) -> tuple[torch.Tensor, list[int] | None]:
    """The (n, d) float32 starting prompt and the token ids it was copied from (None for random)."""
    weight = embedding.weight.detach()
    vocab, n = weight.shape[0], config.n_tokens
    if config.init == "random":
        std = weight.float().std().item()
        return torch.randn(n, weight.shape[1], device=weight.device) * std, None
    if config.init == "vocab":
        ids = torch.randint(0, vocab, (n,)).tolist()
    else:
        if not config.init_token_ids:
            raise ConfigError(
                "method.init_token_ids: init=text needs the token ids of method.init_text; set "
                "config.init_token_ids = tokenizer(init_text)['input_ids'] before apply"
            )
        bad = [i for i in config.init_token_ids if not 0 <= i < vocab]
        if bad:
            raise ConfigError(f"method.init_token_ids: ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        reps = -(-n // len(config.init_token_ids))  # ceil(n / len)
        ids = (list(config.init_token_ids) * reps)[:n]
    rows = weight[torch.tensor(ids, device=weight.device)]
    return rows.float().clone(), ids


def apply_prompt_tuning(model: nn.Module, config: PromptTuningConfig) -> PromptTuningMethod:
    """Freeze ``model`` and register the soft prompt as ``model.prompt_embeddings`` (n, d).

    Args:
        model: a causal LM that accepts ``inputs_embeds``.
        config: the options; with ``init="text"``, ``config.init_token_ids`` must be filled in.

    Returns:
        The :class:`PromptTuningMethod`; use its ``prepare_inputs`` for every forward pass.
    """
    if hasattr(model, PROMPT_PARAM):
        raise ValueError(f"the model already has {PROMPT_PARAM!r}: prompt tuning is applied once per model")
    freeze_all(model)
    prompt, ids = _initial_prompt(input_embeddings(model), config)
    model.register_parameter(PROMPT_PARAM, nn.Parameter(prompt))
    return PromptTuningMethod(model, config, ids)
