"""Continuous batching (finished rows refilled with waiting prompts over a slot KV cache) gives every prompt the
tokens of the plain per-prompt greedy loop, in the order the prompts were given, for every registered method, with
LoRA merged and for the bare base model; and the batch stays full until the queue is empty."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, applied_method, method_family_cases, tiny_llama
from test_generation import reference_greedy

import peftlab.evaluation.generate as generate_module
from peftlab.evaluation.generate import continuous_greedy_generate, greedy_generate
from peftlab.methods.base import BaseModelHandle

pytestmark = pytest.mark.usefixtures("one_thread")

# Not sorted by length (the order of the outputs is checked), 1 to 10 tokens.
PROMPTS = [[5, 9, 17, 33, 40, 7], [11, 3], [60, 61, 62, 63], [8, 8, 8, 8, 8, 8, 8, 8, 2], [70, 20, 4], [44],
           [12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [90, 2, 90], [33, 34, 35, 36, 37], [6, 50]]
CPU = torch.device("cpu")
STEPS = 10


def varied(method):
    """``method`` with every matrix but the input embedding redrawn larger (std 0.3): a tiny random model at init
    mostly repeats the prompt's last token, and then no choice of eos makes its rows finish at different steps.
    Returns ``method``."""
    embedding = method.model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in method.model.parameters():
            if param.ndim == 2 and param is not embedding:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return method


def eos_for_varied_lengths(method, prompts: list[list[int]]) -> set[int]:
    """One or two generated tokens that, taken as eos, end the prompts at the most different steps.

    Tiny random models often repeat one token, so a single eos id leaves most rows at the same length."""
    rows = greedy_generate(method, prompts, pad_id=1, eos_ids={VOCAB + 1}, max_new_tokens=STEPS, device=CPU)
    candidates = sorted({t for row in rows for t in row})

    def lengths(eos: set[int]) -> int:
        return len({next((i for i, t in enumerate(row) if t in eos), len(row)) for row in rows})

    return max(({a, b} for a in candidates for b in candidates), key=lengths)


def check_against_reference(method, batch_sizes=(1, 3, 4), drop_fractions=(0.0, 0.25, 1.0)) -> None:
    eos_ids = eos_for_varied_lengths(method, PROMPTS)
    expected = [reference_greedy(method, p, eos_ids, STEPS) for p in PROMPTS]
    assert len({len(row) for row in expected}) >= 4, "rows should finish at different steps"
    for rows in batch_sizes:
        for drop_fraction in drop_fractions:
            got = continuous_greedy_generate(method, PROMPTS, pad_id=1, eos_ids=eos_ids, max_new_tokens=STEPS,
                                             device=CPU, batch_size=rows, drop_fraction=drop_fraction)
            assert got == expected, f"batch_size={rows}, drop_fraction={drop_fraction}"


@pytest.mark.parametrize(("name", "family"), method_family_cases())
def test_continuous_batching_equals_per_prompt_greedy(name, family):
    check_against_reference(varied(applied_method(name, family)), batch_sizes=(3,), drop_fractions=(0.25,))


@pytest.mark.parametrize(("name", "family"), [("lora", "llama"), ("lora", "gpt2"), ("ia3", "llama"),
                                              ("prompt-tuning", "llama"), ("prefix-tuning", "gpt2"),
                                              ("prefix-tuning", "llama")])
def test_continuous_batching_batch_sizes_and_drops(name, family):
    """The methods that change the forward in different places (merged weights, virtual tokens, cached prefixes),
    with one row, a few, and more rows than prompts, and finished rows kept or dropped once the queue is empty."""
    method = varied(applied_method(name, family))
    if method.mergeable:
        method.merge()
    check_against_reference(method)


def test_continuous_batching_zero_shot():
    check_against_reference(varied(BaseModelHandle(tiny_llama())), batch_sizes=(2, 16))


@pytest.mark.parametrize("refill_rows", [2, 3, 4, 9])
def test_refills_wait_for_enough_free_rows_and_change_no_token(refill_rows, monkeypatch):
    """``refill_rows``: waiting prompts are prefilled only once that many rows are free (or as many as still
    wait), in one prompt pass; every prompt still gets the tokens of the per-prompt greedy loop, also with
    ``refill_rows`` above the batch size."""
    method = varied(applied_method("lora", "llama"))
    eos_ids = eos_for_varied_lengths(method, PROMPTS)
    expected = [reference_greedy(method, p, eos_ids, STEPS) for p in PROMPTS]
    groups: list[int] = []
    real_prefill = generate_module.prefill

    def counting_prefill(method_, prompts, *args, **kwargs):
        groups.append(len(prompts))
        return real_prefill(method_, prompts, *args, **kwargs)

    monkeypatch.setattr(generate_module, "prefill", counting_prefill)
    rows = 4
    got = continuous_greedy_generate(method, PROMPTS, 1, eos_ids, STEPS, CPU, rows, drop_fraction=0.25,
                                     refill_rows=refill_rows)
    assert got == expected
    assert groups[0] == rows and sum(groups) == len(PROMPTS)
    waiting = len(PROMPTS) - rows
    for group in groups[1:]:  # each refill: enough free rows, or every prompt still waiting
        assert group >= min(refill_rows, rows, waiting), groups
        waiting -= group


def test_first_token_eos_and_one_new_token():
    """A newcomer whose first token is eos frees its row at once (and the next prompt takes it); with
    ``max_new_tokens=1`` every row ends at its prefill token and no decode step runs."""
    method = varied(applied_method("lora", "llama"))
    first = [reference_greedy(method, p, set(), 1)[0] for p in PROMPTS]
    eos_ids = {first[1]}
    expected = [reference_greedy(method, p, eos_ids, STEPS) for p in PROMPTS]
    assert [] in expected
    assert continuous_greedy_generate(method, PROMPTS, 1, eos_ids, STEPS, CPU, batch_size=2) == expected
    steps = decode_batch_sizes(method, lambda: continuous_greedy_generate(method, PROMPTS, 1, set(), 1, CPU, 3))
    assert steps == []


def decode_batch_sizes(method, run) -> list[int]:
    """The number of rows of every decode step (one new position per row on a cache) while ``run()`` generates.

    (LoRA's prefill passes no cache: a one-token prompt prefilled alone does not count.)"""
    sizes: list[int] = []

    def record(_module, _args, kwargs):
        if kwargs.get("cache") is not None and kwargs["input_ids"].shape[1] == 1:
            sizes.append(kwargs["input_ids"].shape[0])

    handle = method.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return sizes


def test_batch_stays_full_until_the_queue_is_empty():
    """Only the tail after the last refill (at most ``max_new_tokens - 1`` steps) runs with fewer rows; decoding
    batch after batch instead has such a tail per batch."""
    method = varied(applied_method("lora", "llama"))
    eos_ids = eos_for_varied_lengths(method, PROMPTS)
    rows = 3
    sizes = decode_batch_sizes(method, lambda: continuous_greedy_generate(method, PROMPTS, 1, eos_ids, STEPS, CPU,
                                                                          rows, drop_fraction=0.25))
    assert sizes[0] == rows and sizes == sorted(sizes, reverse=True)
    assert sum(size < rows for size in sizes) <= STEPS - 1
    batched = decode_batch_sizes(method, lambda: [greedy_generate(method, PROMPTS[i:i + rows], 1, eos_ids, STEPS, CPU,
                                                                  drop_fraction=0.25)
                                                  for i in range(0, len(PROMPTS), rows)])
    assert len(sizes) < len(batched), "fewer decode steps: the rows of a finished prompt do not wait"


def test_cache_without_plain_layers_falls_back_to_batch_after_batch(monkeypatch):
    method = varied(applied_method("lora", "llama"))
    monkeypatch.setattr(generate_module, "to_slots", lambda *args, **kwargs: None)
    eos_ids = eos_for_varied_lengths(method, PROMPTS)
    expected = [reference_greedy(method, p, eos_ids, STEPS) for p in PROMPTS]
    assert continuous_greedy_generate(method, PROMPTS, 1, eos_ids, STEPS, CPU, batch_size=3) == expected


def test_predictor_texts_equal_with_and_without_continuous_batching(tiny_llama_dir):
    from peftlab.config import load_config
    from peftlab.lab.experiment import build
    from peftlab.tasks.base import Example

    setup = build(load_config(None, [f"model.name={tiny_llama_dir}", "method=lora", "task.name=summarization",
                                     "task.max_source_tokens=64", "eval.batch_size=2"]))
    sources = ["a short one", "a somewhat longer source text about cats and dogs", "mid length text here",
               "one", "the longest of the sources, with a few more words than the others in it"]
    examples = [Example(id=str(i), source=text, target="x", references=["x"]) for i, text in enumerate(sources)]
    continuous = setup.predictor()
    assert continuous.continuous
    setup.cfg.eval.continuous_batching = False
    batched = setup.predictor()
    assert not batched.continuous
    assert continuous.generate(examples, 8) == batched.generate(examples, 8)


@pytest.mark.parametrize(("name", "family"), [p for p in method_family_cases() if p.values[1] == "llama"])
def test_continuous_batching_under_the_evaluations_bf16_precision(name, family):
    """Under bf16 autocast with the frozen weights cast once (how the studies evaluate), a method whose cache holds
    keys and values of two dtypes (prefix tuning's fp32 prefix values beside bf16 new ones) decodes through the slot
    cache as through the plain one: one row at a time, so the rounding is the same on both sides."""
    from peftlab.models.loading import frozen_matmul_weights_in_bf16

    method = varied(applied_method(name, family))
    method.after_training()  # as evaluation runs it: prefix tuning's MLP folded into fp32 prefixes
    if method.mergeable:
        method.merge()
    with torch.autocast("cpu", dtype=torch.bfloat16), frozen_matmul_weights_in_bf16(method.model):
        expected = [greedy_generate(method, [p], 1, set(), 6, CPU)[0] for p in PROMPTS[:4]]
        got = continuous_greedy_generate(method, PROMPTS[:4], 1, set(), 6, CPU, batch_size=1)
    assert got == expected
