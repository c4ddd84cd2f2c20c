"""Batched generation with a KV cache, and label scoring: the :class:`~peftlab.tasks.base.Predictor` the tasks use.

Prompts are sorted by length and left-padded per prefill; position ids come from the cumulative attention mask (as
Hugging Face ``generate`` computes them), so left padding and prepended virtual tokens do not shift positions. The
method's ``prepare_inputs`` runs once for the prefill step (where soft prompts enter); decoding steps feed one token
per sequence with the cache, and the output head is applied to the last position only (``logits_to_keep=1``).
Greedy decoding uses continuous batching by default (:func:`continuous_greedy_generate`: a finished row takes the
next waiting prompt), optionally with the decode step compiled; :func:`greedy_generate` decodes one batch until all
its rows finish. Beam search goes through ``model.generate`` on the same prepared inputs.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from peftlab.data.batching import left_pad
from peftlab.data.encode import PromptEncoder
from peftlab.evaluation.kv_cache import fill_rows, keep_rows, preallocate, to_slots
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


def decode_step(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache: Any) -> torch.Tensor:
    """One decoding step: ``input_ids`` (B, 1) on top of ``cache``; returns the next-token logits (B, V).

    ``attention_mask`` covers every cached column and the new one; only the last position reaches the head.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


_compiled_decode_step: Callable[..., torch.Tensor] | None = None


def compiled_decode_step() -> Callable[..., torch.Tensor]:
    """:func:`decode_step` under ``torch.compile`` (inductor), built once per process.

    Dynamo keeps the compiled code with ``decode_step``'s code object, guarded on the shapes it saw: with a static
    slot cache (:class:`~peftlab.evaluation.kv_cache.Slots`) every step of a batch has the same shapes, so it
    compiles on the first step and again only when the shapes change (a new number of rows once finished rows
    are dropped, a new cache capacity: after the second such change dynamo marks that dimension dynamic).
    """
    global _compiled_decode_step
    if _compiled_decode_step is None:
        _compiled_decode_step = torch.compile(decode_step)
    return _compiled_decode_step


@torch.no_grad()
def greedy_generate(method: PeftMethod, prompts: Sequence[Sequence[int]], pad_id: int, eos_ids: set[int],
                    max_new_tokens: int, device: torch.device, drop_fraction: float = 0.25) -> list[list[int]]:
    """Greedy continuations of a batch of prompts (token ids), each cut at its first eos (excluded).

    Shapes: prompts left-padded to (B, T); prefill as :func:`prefill`; each decode step (B', 1), where B' counts
    the rows still generating: the KV cache is preallocated (:mod:`peftlab.evaluation.kv_cache`), and once
    ``drop_fraction`` of the live rows have finished they are dropped from the batch (the cache keeps the others'
    rows), so a batch stops paying for rows that wait for its longest output. ``drop_fraction=0`` keeps every row.
    """
    state = prefill(method, prompts, pad_id, device)
    return decode_prefilled(method, state, pad_id, eos_ids, max_new_tokens, device, drop_fraction)


def decode_prefilled(method: PeftMethod, state: Prefilled, pad_id: int, eos_ids: set[int], max_new_tokens: int,
                     device: torch.device, drop_fraction: float = 0.25) -> list[list[int]]:
    """The decoding loop of :func:`greedy_generate` from a prefilled batch: one list of tokens per row."""
    cache, logits, attention_mask, position = state.cache, state.logits, state.attention_mask, state.position
    droppable = preallocate(cache, max_new_tokens) and drop_fraction > 0
    outputs: list[list[int]] = [[] for _ in range(len(logits))]
    live = list(range(len(logits)))  # the prompt index of each row still in the batch
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
        logits = decode_step(method.model, next_token[:, None], attention_mask, position, cache)
    return [_cut_at_eos(row, eos_ids) for row in outputs]


class NoSlotCacheError(ValueError):
    """:func:`continuous_greedy_generate` was given ``ends`` for a model whose KV cache is not plain (it decodes one
    batch after another, where output lengths cannot be set)."""


@torch.no_grad()
def continuous_greedy_generate(method: PeftMethod, prompts: Sequence[Sequence[int]], pad_id: int, eos_ids: set[int],
                               max_new_tokens: int, device: torch.device, batch_size: int,
                               drop_fraction: float = 0.25, compile_step: bool = False,
                               refill_rows: int = 1, ends: Sequence[int] | None = None) -> list[list[int]]:
    """Greedy continuations of every prompt, decoded ``batch_size`` rows at a time with continuous batching.

    The first ``batch_size`` prompts are prefilled together (:func:`prefill`) and their cache becomes a slot cache
    (:func:`~peftlab.evaluation.kv_cache.to_slots`: one sequence per row, each at its own length and position).
    When rows finish (eos or ``max_new_tokens``), the next waiting prompts are prefilled as one group and copied
    into the freed rows, whose first token comes from that prefill; so the batch stays full until the queue is
    empty, and only then are finished rows dropped (as in :func:`greedy_generate`, once ``drop_fraction`` of the
    rows have finished). Each row keeps its own position ids and attention mask, so a row's tokens are those of
    the prompt decoded alone. Returns the continuations in the order of ``prompts`` (pass them sorted by length:
    rows then finish at similar times and a newcomer is never much longer than the batch).

    ``refill_rows``: waiting prompts are prefilled once that many rows are free (or as many as are still waiting),
    the free rows idling meanwhile; a prompt pass over several rows costs less per row than over one. In fp32 the
    tokens do not depend on it; under bf16 autocast, which prompts share a prefill changes the rounding, and some
    rows their tokens (10 of 32 CNN/DM articles at 4 or 8; BENCHMARKS.md), as ``batch_size`` does.

    ``compile_step`` runs each decode step through :func:`compiled_decode_step` over the slot cache's full
    capacity (fixed shapes). A model whose cache is not plain (sliding-window layers, ...) falls back to
    :func:`greedy_generate` one batch at a time.

    ``ends``: prompt ``i``'s token after ``ends[i]`` outputs counts as its eos, whatever it is (the loop then runs
    the passes :func:`~peftlab.evaluation.schedule.generation_schedule` replays for those lengths; the estimate's
    calibration times it so). Not with the fallback: :class:`NoSlotCacheError`.
    """
    if not prompts:
        return []
    queue = deque(range(len(prompts)))
    first = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
    state = prefill(method, [prompts[i] for i in first], pad_id, device)
    virtual = state.attention_mask.shape[1] - max(len(prompts[i]) for i in first)  # soft prompt or prefix
    capacity = virtual + max(len(p) for p in prompts) + max_new_tokens
    slots = to_slots(state.cache, state.attention_mask, capacity, static=compile_step)
    if slots is None:
        if ends is not None:
            raise NoSlotCacheError("ends: needs a plain KV cache (this model's falls back to one batch after another)")
        return _batch_after_batch(method, prompts, state, first, list(queue), pad_id, eos_ids, max_new_tokens,
                                  device, batch_size, drop_fraction)
    step = compiled_decode_step() if compile_step else decode_step
    batch = _Rows(first, [0] * len(first), eos_ids, max_new_tokens, [[] for _ in prompts], ends=ends)
    next_token, position = state.logits.argmax(-1), state.position.clone()  # (R,), (R, 1)
    batch.take(range(len(first)), next_token.tolist())
    progress = tqdm(total=len(prompts), desc="generate", unit="prompt", leave=False, mininterval=2.0)
    while True:
        # Refill once enough rows are free; a newcomer may end at its first token and free its row.
        while queue and len(free := batch.free()) >= min(refill_rows, len(batch.prompt), len(queue)):
            newcomers = [queue.popleft() for _ in range(min(len(free), len(queue)))]
            rows = free[:len(newcomers)]
            new = prefill(method, [prompts[i] for i in newcomers], pad_id, device)
            fill_rows(state.cache, slots, rows, new.cache, new.attention_mask)
            index = torch.tensor(rows, device=device)
            next_token[index], position[index] = new.logits.argmax(-1), new.position
            batch.start(rows, newcomers)
            batch.take(rows, next_token[index].tolist())
        live = batch.live()
        if not live:
            break
        finished = len(batch.prompt) - len(live)  # rows without a prompt, waiting for a refill or for none
        if not queue and drop_fraction > 0 and finished and finished >= max(1.0, drop_fraction * len(batch.prompt)):
            keep = torch.tensor(live, device=device)
            keep_rows(state.cache, keep)
            slots.keep(keep)
            next_token, position = next_token[keep], position[keep]
            batch.keep(live)
        advancing = torch.tensor([p is not None for p in batch.prompt], device=device)
        next_token = torch.where(advancing, next_token, pad_id)  # a finished row kept in the batch is fed padding
        position = position + advancing[:, None]
        logits = step(method.model, next_token[:, None], slots.begin_step(), position, state.cache)
        slots.end_step(advancing)
        next_token = logits.argmax(-1)
        live = batch.live()
        batch.take(live, next_token[torch.tensor(live, device=device)].tolist())
        progress.update(batch.finished - progress.n)
    progress.close()
    return batch.outputs


def _batch_after_batch(method: PeftMethod, prompts: Sequence[Sequence[int]], state: Prefilled, first: list[int],
                       rest: list[int], pad_id: int, eos_ids: set[int], max_new_tokens: int, device: torch.device,
                       batch_size: int, drop_fraction: float) -> list[list[int]]:
    """What :func:`continuous_greedy_generate` does for a cache it cannot turn into slots: ``first`` (prefilled as
    ``state``) decoded as one batch, then ``rest`` in batches of ``batch_size``, as :func:`greedy_generate` does."""
    outputs: list[list[int]] = [[] for _ in prompts]
    rows = decode_prefilled(method, state, pad_id, eos_ids, max_new_tokens, device, drop_fraction)
    for start in range(0, len(rest), batch_size):
        rows += greedy_generate(method, [prompts[i] for i in rest[start:start + batch_size]], pad_id, eos_ids,
                                max_new_tokens, device, drop_fraction)
    for i, row in zip([*first, *rest], rows, strict=True):
        outputs[i] = row
    return outputs


@dataclass
class _Rows:
    """The rows of a continuous batch: which prompt each row holds (None once it finished) and what it generated.

    ``outputs`` is indexed by prompt; a row's eos token is not stored. ``finished`` counts the prompts done;
    ``ends`` (by prompt) makes a prompt's token after that many outputs its eos.
    """

    prompt: list[int | None]
    made: list[int]
    eos_ids: set[int]
    max_new_tokens: int
    outputs: list[list[int]]
    finished: int = 0
    ends: Sequence[int] | None = None

    def live(self) -> list[int]:
        return [row for row, p in enumerate(self.prompt) if p is not None]

    def free(self) -> list[int]:
        return [row for row, p in enumerate(self.prompt) if p is None]

    def start(self, rows: Sequence[int], prompts: Sequence[int]) -> None:
        for row, p in zip(rows, prompts, strict=True):
            self.prompt[row], self.made[row] = p, 0

    def take(self, rows: Iterable[int], tokens: Sequence[int]) -> None:
        """Append each row's new token to its prompt's output; a row ends at eos or at ``max_new_tokens``."""
        for row, token in zip(rows, tokens, strict=True):
            p = self.prompt[row]
            eos = token in self.eos_ids or (self.ends is not None and self.made[row] == self.ends[p])
            if not eos:
                self.outputs[p].append(token)
                self.made[row] += 1
            if eos or self.made[row] == self.max_new_tokens:
                self.prompt[row] = None
                self.finished += 1

    def keep(self, rows: Sequence[int]) -> None:
        self.prompt, self.made = [self.prompt[r] for r in rows], [self.made[r] for r in rows]


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
        batch_size: prompts per batch (rows of the continuous batch).
        num_beams: 1 for greedy decoding, more for beam search.
        device: where the model lives.
        autocast_bf16: run under bfloat16 autocast, with the frozen matmul weights cast to bf16 once per call
            instead of at every forward (:func:`~peftlab.models.loading.frozen_matmul_weights_in_bf16`: the same
            numbers as plain autocast, and decode steps no longer pay a cast of the whole model each).
        continuous_batching: greedy decoding refills finished rows with waiting prompts
            (:func:`continuous_greedy_generate`); False decodes one length-sorted batch after another
            (:func:`greedy_generate`), as before it existed.
        compile_decode: with continuous batching, run each decode step through ``torch.compile``
            (:func:`compiled_decode_step`).
        refill_rows: with continuous batching, prefill waiting prompts once this many rows are free.
    """

    def __init__(self, method: PeftMethod, tokenizer, encoder: PromptEncoder, batch_size: int = 16,
                 num_beams: int = 1, device: torch.device | str = "cpu", autocast_bf16: bool = False,
                 continuous_batching: bool = True, compile_decode: bool = False, refill_rows: int = 1) -> None:
        self.method, self.tokenizer, self.encoder = method, tokenizer, encoder
        self.batch_size, self.num_beams, self.device = batch_size, num_beams, torch.device(device)
        self.autocast = autocast_bf16
        self.continuous, self.compile_decode, self.refill_rows = continuous_batching, compile_decode, refill_rows
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = eos_token_ids(method.model, tokenizer)

    @contextlib.contextmanager
    def precision(self) -> Iterator[None]:
        """bf16 autocast with the frozen weights cast once, when ``autocast_bf16``; else nothing."""
        if not self.autocast:
            yield
            return
        with torch.autocast(self.device.type, dtype=torch.bfloat16), frozen_matmul_weights_in_bf16(self.method.model):
            yield

    def generate(self, examples: Sequence[Example], max_new_tokens: int) -> list[str]:
        rows = self.generate_ids(self.encoder.encode_prompts(list(examples)), max_new_tokens)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """The continuation (token ids, cut at eos) of every prompt (token ids), in the order given.

        Prompts are decoded sorted by length, so rows of a batch have similar lengths and finish at similar times.
        """
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        was_training = self.method.model.training
        self.method.model.eval()
        with self.precision():
            if self.num_beams == 1 and self.continuous:
                rows = continuous_greedy_generate(self.method, [prompts[i] for i in order], self.pad_id,
                                                  self.eos_ids, max_new_tokens, self.device, self.batch_size,
                                                  compile_step=self.compile_decode, refill_rows=self.refill_rows)
            else:
                rows = []
                for start in tqdm(range(0, len(order), self.batch_size), desc="generate", unit="batch",
                                  leave=False, mininterval=2.0):
                    chunk = [prompts[i] for i in order[start:start + self.batch_size]]
                    if self.num_beams > 1:
                        rows += beam_generate(self.method, chunk, self.pad_id, self.eos_ids, max_new_tokens,
                                              self.num_beams, self.device)
                    else:
                        rows += greedy_generate(self.method, chunk, self.pad_id, self.eos_ids, max_new_tokens,
                                                self.device)
        self.method.model.train(was_training)
        by_prompt: list[list[int]] = [[] for _ in prompts]
        for i, row in zip(order, rows, strict=True):
            by_prompt[i] = row
        return by_prompt

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
        with self.precision():
            for start in tqdm(range(0, len(order), self.batch_size), desc="score labels", unit="batch", leave=False,
                              mininterval=2.0):
                idx = order[start:start + self.batch_size]
                rows = score_continuations(self.method, [prompts[i] for i in idx], choice_ids, self.pad_id,
                                           self.device)
                for i, row in zip(idx, rows.tolist(), strict=True):
                    scores[i] = row
        self.method.model.train(was_training)
        return scores
