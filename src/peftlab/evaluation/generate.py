"""Batched generation with a KV cache, and label scoring: the :class:`~peftlab.tasks.base.Predictor` the tasks use.

Prompts are sorted by length and left-padded per batch; position ids come from the cumulative attention mask (as
Hugging Face ``generate`` computes them), so left padding and prepended virtual tokens do not shift positions. The
method's ``prepare_inputs`` runs once for the prefill step (where soft prompts enter); decoding steps feed one token
per sequence with the cache, and the output head is applied to the last position only (``logits_to_keep=1``).
Greedy decoding uses this loop; beam search goes through ``model.generate`` on the same prepared inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from peftlab.data.batching import left_pad
from peftlab.data.encode import PromptEncoder
from peftlab.evaluation.kv_cache import keep_rows, preallocate
from peftlab.methods.base import PeftMethod
from peftlab.models.loading import frozen_matmul_weights_in_bf16
from peftlab.tasks.base import Example


def eos_token_ids(model: nn.Module, tokenizer) -> set[int]:
    """Every id that ends a generation: the tokenizer's eos and the model's generation-config eos ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return ids


@dataclass
class Prefilled:
    """A batch of left-padded prompts after one forward pass with a KV cache: what decoding and scoring continue.

    ``attention_mask`` covers everything in the cache (virtual tokens and padding included): (B, S); ``position``
    is each row's last position id (B, 1); ``logits`` are those of the last prompt position (B, V).
    """

    cache: Any
    logits: torch.Tensor
    attention_mask: torch.Tensor
    position: torch.Tensor


def prefill(method: PeftMethod, prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> Prefilled:
    """Run the prompts once through the model with the method's ``prepare_inputs`` (soft prompts, prefixes).

    Shapes: prompts left-padded to (B, T); the fed sequence is (B, n+T) with n virtual tokens (prompt tuning) or
    (B, T) with n prefix positions already in the cache (prefix tuning); only the last position reaches the head.
    """
    input_ids, attention_mask = left_pad([list(p) for p in prompts], pad_id)
    inputs = method.prepare_inputs(input_ids.to(device), attention_mask.to(device))
    attention_mask = inputs["attention_mask"]
    # The mask may be longer than the fed sequence: prefix tuning's n virtual positions sit in the cache, not in it.
    fed = inputs["input_ids"] if "input_ids" in inputs else inputs["inputs_embeds"]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -fed.shape[1]:]
    out = method.model(**inputs, position_ids=position_ids, use_cache=True, logits_to_keep=1)
    return Prefilled(out.cache, out.logits[:, -1], attention_mask, position_ids[:, -1:])


@torch.no_grad()
def greedy_generate(method: PeftMethod, prompts: Sequence[Sequence[int]], pad_id: int, eos_ids: set[int],
                    max_new_tokens: int, device: torch.device, drop_fraction: float = 0.25) -> list[list[int]]:
    """Greedy continuations of a batch of prompts (token ids), each cut at its first eos (excluded).

    Shapes: prompts left-padded to (B, T); prefill as :func:`prefill`; each decode step (B', 1), where B' counts
    the rows still generating: the KV cache is preallocated (:mod:`peftlab.evaluation.kv_cache`), and once
    ``drop_fraction`` of the live rows have finished they are dropped from the batch (the cache keeps the others'
    rows), so a batch stops paying for rows that wait for its longest output. ``drop_fraction=0`` keeps every row.
    """
    model = method.model
    state = prefill(method, prompts, pad_id, device)
    cache, logits, attention_mask, position = state.cache, state.logits, state.attention_mask, state.position
    droppable = preallocate(cache, max_new_tokens) and drop_fraction > 0
    outputs: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))  # the prompt index of each row still in the batch
    eos = torch.tensor(sorted(eos_ids), device=device)
    for step in range(max_new_tokens):
        next_token = logits.argmax(-1)  # (B',)
        for row, token in zip(live, next_token.tolist(), strict=True):
            outputs[row].append(token)
        done = torch.isin(next_token, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if droppable and int(done.sum()) >= max(1.0, drop_fraction * len(live)):
            keep = (~done).nonzero().squeeze(1)
            keep_rows(cache, keep)
            attention_mask, position, next_token = attention_mask[keep], position[keep], next_token[keep]
            live = [live[i] for i in keep.tolist()]
        else:  # a finished row that stays in the batch is fed padding from now on; its output is already cut
            next_token = torch.where(done, torch.full_like(next_token, pad_id), next_token)
            for i in done.nonzero().squeeze(1).tolist():
                outputs[live[i]].append(pad_id)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(live), 1)], dim=1)
        position = position + 1
        out = model(input_ids=next_token[:, None], attention_mask=attention_mask, position_ids=position,
                    cache=cache, use_cache=True, logits_to_keep=1)
        cache, logits = out.cache, out.logits[:, -1]
    return [_cut_at_eos(row, eos_ids) for row in outputs]


@torch.no_grad()
def score_continuations(method: PeftMethod, prompts: Sequence[Sequence[int]], choices: Sequence[Sequence[int]],
                        pad_id: int, device: torch.device) -> torch.Tensor:
    """Summed log-probability of every choice (token ids) after every prompt: (B, C), in float32.

    One forward pass over the prompts (:func:`prefill`) gives each choice's first token; a choice of L tokens then
    feeds its first L - 1 tokens on top of the prompts' KV cache, (B, L - 1), and the cache is cropped back to the
    prompts before the next choice. So a prompt of T tokens costs T + sum(L - 1) positions instead of C * (T + L)
    with one sequence per (prompt, choice) pair.
    """
    state = prefill(method, prompts, pad_id, device)
    first = torch.log_softmax(state.logits.float(), dim=-1)  # (B, V)
    batch = len(prompts)
    scores = torch.empty(batch, len(choices), device=device)
    for j, choice in enumerate(choices):
        scores[:, j] = first[:, choice[0]]
        if len(choice) == 1:
            continue
        rest = len(choice) - 1
        feed = torch.tensor(choice[:-1], device=device).expand(batch, rest)  # (B, L-1)
        mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(batch, rest)], dim=1)
        positions = state.position + torch.arange(1, rest + 1, device=device)  # (B, L-1)
        out = method.model(input_ids=feed, attention_mask=mask, position_ids=positions, cache=state.cache,
                           use_cache=True)
        logp = torch.log_softmax(out.logits.float(), dim=-1)  # (B, L-1, V)
        targets = torch.tensor(choice[1:], device=device).expand(batch, rest)
        scores[:, j] += logp.gather(-1, targets[..., None]).squeeze(-1).sum(-1)
        state.cache.crop(-rest)  # drop the choice's keys again: the cache holds the prompts only
    return scores


def _cut_at_eos(row: list[int], eos_ids: set[int]) -> list[int]:
    for i, tok in enumerate(row):
        if tok in eos_ids:
            return row[:i]
    return row


@torch.no_grad()
def beam_generate(method: PeftMethod, prompts: Sequence[Sequence[int]], pad_id: int, eos_ids: set[int],
                  max_new_tokens: int, num_beams: int, device: torch.device) -> list[list[int]]:
    """Beam search through ``model.generate`` on the method's prepared (prefill) inputs."""
    input_ids, attention_mask = left_pad([list(p) for p in prompts], pad_id)
    inputs = method.prepare_inputs(input_ids.to(device), attention_mask.to(device))
    if "cache" in inputs:
        # transformers' generate neither expands a prefilled cache per beam nor expects it before input_ids.
        raise ValueError("eval.num_beams > 1 is not supported yet for methods that prefill the KV cache "
                         "(prefix tuning); use eval.num_beams=1")
    out = method.model.generate(**inputs, num_beams=num_beams, do_sample=False, max_new_tokens=max_new_tokens,
                                pad_token_id=pad_id, eos_token_id=sorted(eos_ids))
    # With input_ids, generate returns prompt + continuation; with inputs_embeds, the continuation only.
    new = out[:, input_ids.shape[1]:] if "input_ids" in inputs else out
    return [_cut_at_eos(row, eos_ids) for row in new.tolist()]


class ModelPredictor:
    """Implements the tasks' ``Predictor`` protocol for a model with a PEFT method applied.

    Args:
        method: the applied method (``method.model`` is used in eval mode).
        tokenizer: the model's tokenizer.
        encoder: builds prompt and target token ids exactly as in training.
        batch_size: prompts per batch.
        num_beams: 1 for greedy decoding, more for beam search.
        device: where the model lives.
        autocast_bf16: run under bfloat16 autocast, with the frozen matmul weights cast to bf16 once per call
            instead of at every forward (:func:`~peftlab.models.loading.frozen_matmul_weights_in_bf16`: the same
            numbers as plain autocast, and decode steps no longer pay a cast of the whole model each).
    """

    def __init__(self, method: PeftMethod, tokenizer, encoder: PromptEncoder, batch_size: int = 16,
                 num_beams: int = 1, device: torch.device | str = "cpu", autocast_bf16: bool = False) -> None:
        self.method, self.tokenizer, self.encoder = method, tokenizer, encoder
        self.batch_size, self.num_beams, self.device = batch_size, num_beams, torch.device(device)
        self.autocast = autocast_bf16
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = eos_token_ids(method.model, tokenizer)

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        """bf16 autocast with the frozen weights cast once, when ``autocast_bf16``; else nothing."""
        if not self.autocast:
            yield
            return
        with torch.autocast(self.device.type, dtype=torch.bfloat16), frozen_matmul_weights_in_bf16(self.method.model):
            yield

    def generate(self, examples: Sequence[Example], max_new_tokens: int) -> list[str]:
        prompts = self.encoder.encode_prompts(list(examples))
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        texts: list[str] = [""] * len(prompts)
        was_training = self.method.model.training
        self.method.model.eval()
        with self._precision():
            for start in tqdm(range(0, len(order), self.batch_size), desc="generate", unit="batch", leave=False,
                              mininterval=2.0):
                idx = order[start:start + self.batch_size]
                chunk = [prompts[i] for i in idx]
                if self.num_beams > 1:
                    rows = beam_generate(self.method, chunk, self.pad_id, self.eos_ids, max_new_tokens,
                                         self.num_beams, self.device)
                else:
                    rows = greedy_generate(self.method, chunk, self.pad_id, self.eos_ids, max_new_tokens, self.device)
                for i, row in zip(idx, rows, strict=True):
                    texts[i] = self.tokenizer.decode(row, skip_special_tokens=True).strip()
        self.method.model.train(was_training)
        return texts

    @torch.no_grad()
    def score_choices(self, examples: Sequence[Example], choices: Sequence[str]) -> list[list[float]]:
        """Summed log-probability of each choice (its tokens plus eos, as trained) after each prompt: (N, C).

        Each prompt runs through the model once for all choices (:func:`score_continuations`).
        """
        choice_ids = self.encoder.encode_targets(list(choices))
        prompts = self.encoder.encode_prompts(list(examples))
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        scores: list[list[float]] = [[] for _ in prompts]
        was_training = self.method.model.training
        self.method.model.eval()
        with self._precision():
            for start in tqdm(range(0, len(order), self.batch_size), desc="score labels", unit="batch", leave=False,
                              mininterval=2.0):
                idx = order[start:start + self.batch_size]
                rows = score_continuations(self.method, [prompts[i] for i in idx], choice_ids, self.pad_id,
                                           self.device)
                for i, row in zip(idx, rows.tolist(), strict=True):
                    scores[i] = row
        self.method.model.train(was_training)
        return scores
