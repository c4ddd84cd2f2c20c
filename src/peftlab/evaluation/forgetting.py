"""Forgetting: the model's cross-entropy on a fixed sample of out-of-task text, before and after training.

A method that fits the task equally well as another may still have moved the model further from what it was: its
language-model loss on unrelated text rises more. peftlab measures this as PEFT's own method comparison does, as a
mean per-token cross-entropy (nats) on a fixed text sample:

* ``eval.forgetting_data``: where the text comes from (a dataset folder, a file, ``demo`` or a hub name, read as
  ``data.path`` is), ``eval.forgetting_split`` / ``eval.forgetting_field`` which split and field (a list of strings
  is joined by newlines), ``eval.forgetting_examples`` how many texts (a seeded sample of the split's first
  :data:`SAMPLE_POOL` rows, so every run of every method reads the same texts) and ``eval.forgetting_tokens`` the
  length each text is cut to.
* **before**: the base model, measured in a training run right after the method is applied and before any step.
  Every method is the identity at initialisation (LoRA's B, adapters' up-projections and IA3's scales start at
  zero / one), and the text is fed without the method's virtual tokens, so this is the untouched base model's
  cross-entropy (``tests/test_forgetting.py`` checks it for every method).
* **after**: the trained model exactly as it is used, through ``method.prepare_inputs`` (a soft prompt or prefix is
  in front of the text).

The loss is taken on every text token but the first (which nothing predicts).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from peftlab.data.readers import open_split
from peftlab.tasks.base import DataError
from peftlab.training.loss import IGNORE_INDEX, sequence_log_probs

SAMPLE_POOL = 1000  # texts are sampled from the split's first rows: reading a 25k-review split whole is not needed
SAMPLE_SEED = 0
BATCH_SIZE = 8


def forgetting_texts(path: str, split: str, field: str, count: int, hub_config: str | None = None) -> list[str]:
    """``count`` texts from ``field`` of ``split`` (a seeded sample of the first :data:`SAMPLE_POOL` rows).

    Raises:
        DataError: a row lacks ``field`` or holds no text there (naming ``file:line`` and the row's fields), or the
            split has fewer usable rows than ``count``.
    """
    rows, source = open_split(path, split, hub_config)
    pool: list[str] = []
    for row, where in rows:
        if field not in row:
            raise DataError(f"{where}: eval.forgetting_field {field!r} is not a field of this row; its fields: "
                            f"{', '.join(sorted(map(str, row)))}")
        value = row[field]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = "\n".join(value)
        if not isinstance(value, str):
            raise DataError(f"{where}: eval.forgetting_field {field!r} holds {type(value).__name__}, not text")
        if value.strip():
            pool.append(value.strip())
        if len(pool) >= SAMPLE_POOL:
            break
    if len(pool) < count:
        raise DataError(f"{source}: eval.forgetting_examples={count}, but the split has only {len(pool)} non-empty "
                        f"{field!r} texts")
    chosen = sorted(random.Random(SAMPLE_SEED).sample(range(len(pool)), count))
    return [pool[i] for i in chosen]


def encode_texts(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each text (no special tokens), cut to ``max_tokens``; texts of fewer than 2 tokens are dropped."""
    ids = [tokenizer(text, add_special_tokens=False).input_ids[:max_tokens] for text in texts]
    return [seq for seq in ids if len(seq) >= 2]


@torch.no_grad()
def text_cross_entropy(model: torch.nn.Module, token_ids: Sequence[Sequence[int]], pad_id: int,
                       prepare: Callable[..., dict[str, torch.Tensor]] | None = None,
                       device: torch.device | str = "cpu", autocast: bool = False) -> tuple[float, int]:
    """Mean per-token cross-entropy (nats) of ``model`` on the texts, and the number of tokens scored.

    Args:
        model: a ``*ForCausalLM`` model.
        token_ids: the encoded texts (see :func:`encode_texts`).
        pad_id: the padding id (right padding; padded positions carry no loss).
        prepare: ``method.prepare_inputs`` to score the adapted model as used (virtual tokens added), or None to
            feed the text as is.
        device: where the model is.
        autocast: run under bfloat16 autocast.
    """
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))  # similar lengths share a batch
    try:
        for start in range(0, len(order), BATCH_SIZE):
            batch = [token_ids[i] for i in order[start:start + BATCH_SIZE]]
            width = max(len(seq) for seq in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(batch):
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            ids, mask = ids.to(device), mask.to(device)
            labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
            # On the device before the method sees them: what it returns may hold more than tensors (prefix
            # tuning's past_key_values), built where the model is, as in training and generation.
            inputs = prepare(ids, mask, labels) if prepare is not None else {
                "input_ids": ids, "attention_mask": mask, "labels": labels}
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
                log_probs = sequence_log_probs(model, inputs)
            total_nll -= float(log_probs.sum())
            total_tokens += sum(len(seq) - 1 for seq in batch)
    finally:
        model.train(was_training)
    return total_nll / max(total_tokens, 1), total_tokens
