"""Batches: padding for training (right) and generation (left), and length-bucketed batch order."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from peftlab.data.encode import IGNORE_INDEX, EncodedExample

# Bucketing sorts by length within windows of this many batches: big enough that neighbours have similar lengths,
# small enough that batch composition still changes from epoch to epoch.
BUCKET_WINDOW_BATCHES = 50


def collate(batch: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a training batch.

    Returns:
        ``input_ids`` (B, T) padded with ``pad_id``, ``attention_mask`` (B, T) 1 on real tokens, and ``labels``
        (B, T) with ``IGNORE_INDEX`` on the prompt and on padding; T is the longest sequence in the batch.
    """
    if not batch:
        raise ValueError("collate: empty batch")
    width = max(len(example.input_ids) for example in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        if len(example.labels) != len(example.input_ids):
            raise ValueError(f"collate: example {row} has {len(example.input_ids)} input ids but "
                             f"{len(example.labels)} labels")
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for batched generation, so every prompt ends at the last column where new tokens start.

    Returns:
        ``input_ids`` (B, T) and ``attention_mask`` (B, T), 0 on the padding at the left.
    """
    if not seqs:
        raise ValueError("left_pad: no sequences")
    width = max(len(seq) for seq in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if len(seq) == 0:
            raise ValueError(f"left_pad: sequence {row} is empty")
        input_ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
        attention_mask[row, width - len(seq):] = 1
    return input_ids, attention_mask


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                            bucketing: bool = True) -> list[list[int]]:
    """The batches of one epoch, as lists of example indices; every index appears exactly once.

    Without bucketing: a seeded shuffle cut into batches. With bucketing: the same shuffle, then within each
    window of ``BUCKET_WINDOW_BATCHES`` batches the indices are sorted by length and cut into batches, and the
    order of all batches is shuffled. Batches then hold similar lengths (less padding) yet differ per epoch. Only the
    last window can leave one short batch.

    Args:
        lengths: token length of each example.
        batch_size: examples per batch.
        seed: run seed; with ``epoch`` it fully determines the result.
        epoch: epoch number (a different order each epoch).
        bucketing: group similar lengths (True) or not.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    # A string seed is hashed with SHA-512 by random.Random: the same batches in every process and Python version.
    rng = random.Random(f"peftlab-batches:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not bucketing:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * BUCKET_WINDOW_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        # sorted() is stable: equal lengths keep their shuffled order.
        part = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches
