"""Causal-LM loss on target positions only, without full-vocabulary logits anywhere else.

A Hugging Face ``*ForCausalLM`` forward computes logits for every position: (B, T, V) floats, which for a
49k-token vocabulary and a 512-token article is ~100 MB per example, almost all for prompt positions whose loss is
never taken. Here the decoder trunk runs alone, the hidden states of the positions that predict a target token are
gathered, and only those go through the output head:

    h = trunk(x)                       # (B, T, d)
    sel = labels[:, 1:] != -100        # position t predicts token t+1
    logits = head(h[:, :-1][sel])      # (N, V), N = number of target tokens
    loss = CE(logits, labels[:, 1:][sel])

Cross-entropy is taken in chunks of rows so the (N, V) float32 logits never exist at once for long targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.models.arch import output_head, trunk

IGNORE_INDEX = -100
CE_CHUNK_ROWS = 1024


def target_hidden_states(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of the positions that predict a label, and those labels.

    Args:
        model: a ``*ForCausalLM`` model.
        inputs: ``input_ids`` or ``inputs_embeds``, ``attention_mask``, ``labels`` (B, T), optional ``position_ids``.

    Returns:
        ``(h, y)``: h (N, d) hidden states, y (N,) target token ids, N = number of labelled positions.
    """
    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = trunk(model)(**model_inputs, use_cache=False).last_hidden_state  # (B, T, d)
    shifted = labels[:, 1:]  # (B, T-1): the token each position t predicts
    selected = shifted != IGNORE_INDEX
    return hidden[:, :-1][selected], shifted[selected]


def chunked_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                          reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of ``head(hidden)`` against ``targets``, CE_CHUNK_ROWS rows at a time.

    Args:
        head: output projection d -> V.
        hidden: (N, d).
        targets: (N,).
        reduction: "sum" (a scalar) or "none" (per-row losses, (N,)).
    """
    pieces = []
    for start in range(0, hidden.shape[0], CE_CHUNK_ROWS):
        logits = head(hidden[start:start + CE_CHUNK_ROWS]).float()  # (n, V) in fp32 for a stable log-softmax
        pieces.append(F.cross_entropy(logits, targets[start:start + CE_CHUNK_ROWS],
                                      reduction="sum" if reduction == "sum" else "none"))
    if not pieces:
        return hidden.new_zeros(() if reduction == "sum" else (0,), dtype=torch.float32)
    return torch.stack(pieces).sum() if reduction == "sum" else torch.cat(pieces)


def target_only_loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed token cross-entropy over labelled positions, and the number of those positions.

    Returning the sum (not the mean) lets gradient accumulation divide by the token count of the whole optimizer
    step, so the result does not depend on how the step is split into micro-batches.
    """
    hidden, targets = target_hidden_states(model, inputs)
    return chunked_cross_entropy(output_head(model), hidden, targets), int(targets.numel())


def sequence_log_probs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability of each sequence's labelled tokens: (B,). Used to rank classification labels."""
    labels = inputs["labels"]
    hidden, targets = target_hidden_states(model, inputs)
    token_nll = chunked_cross_entropy(output_head(model), hidden, targets, reduction="none")  # (N,)
    # Row b of the batch owns the labelled positions counted in its row of the mask.
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
    owner = torch.repeat_interleave(torch.arange(labels.shape[0], device=labels.device), counts)
    return -torch.zeros(labels.shape[0], device=token_nll.device).index_add_(0, owner, token_nll)
