"""Greedy decoding with the preallocated KV cache and finished rows dropped from the batch gives the tokens of the
plain per-prompt greedy loop (no cache, no padding, one full forward per step), for every registered method."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, applied_method, method_family_cases
from transformers import DynamicCache

from peftlab.evaluation.generate import greedy_generate, prefill
from peftlab.evaluation.kv_cache import PreallocatedLayer, keep_rows, preallocate

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 9, 17, 33, 40, 7], [11, 3], [60, 61, 62, 63], [8, 8, 8, 8, 8, 8, 8, 8, 2], [70, 20, 4]]
CPU = torch.device("cpu")


@torch.no_grad()
def reference_greedy(method, prompt: list[int], eos_ids: set[int], steps: int) -> list[int]:
    """One prompt, no cache: the whole sequence through the method's prepare_inputs at every step."""
    sequence: list[int] = []
    for _ in range(steps):
        ids = torch.tensor([prompt + sequence])
        logits = method.model(**method.prepare_inputs(ids, torch.ones_like(ids))).logits[0, -1]
        token = int(logits.argmax())
        if token in eos_ids:
            break
        sequence.append(token)
    return sequence


def eos_for_varied_lengths(method) -> set[int]:
    """The generated token that, taken as eos, ends the rows at the most different steps."""
    rows = greedy_generate(method, PROMPTS, pad_id=1, eos_ids={VOCAB + 1}, max_new_tokens=12, device=CPU)

    def lengths(token: int) -> set[int]:
        return {row.index(token) if token in row else len(row) for row in rows}

    return {max(sorted({t for row in rows for t in row}), key=lambda t: len(lengths(t)))}


@pytest.mark.parametrize(("name", "family"), method_family_cases())
def test_batched_greedy_equals_per_prompt_greedy(name, family):
    method = applied_method(name, family)
    eos_ids = eos_for_varied_lengths(method)
    expected = [reference_greedy(method, p, eos_ids, 12) for p in PROMPTS]
    assert len({len(row) for row in expected}) > 1, "rows should finish at different steps"
    for drop_fraction in (0.0, 0.25, 1.0):
        got = greedy_generate(method, PROMPTS, pad_id=1, eos_ids=eos_ids, max_new_tokens=12, device=CPU,
                              drop_fraction=drop_fraction)
        assert got == expected, f"drop_fraction={drop_fraction}"


def test_preallocated_layer_matches_concatenation_and_drops_rows():
    method = applied_method("lora", "llama")
    state = prefill(method, PROMPTS[:3], pad_id=1, device=CPU)
    reference = DynamicCache(config=method.model.config)
    for layer, source in enumerate(state.cache.layers):
        reference.update(source.keys.clone(), source.values.clone(), layer)
    assert preallocate(state.cache, room=4)
    assert all(isinstance(layer, PreallocatedLayer) for layer in state.cache.layers)
    new_k, new_v = torch.randn(3, 2, 2, 8), torch.randn(3, 2, 2, 8)
    got, want = state.cache.update(new_k, new_v, 0), reference.update(new_k, new_v, 0)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert state.cache.get_seq_length(0) == reference.get_seq_length(0)
    keep_rows(state.cache, torch.tensor([2, 0]))
    assert torch.equal(state.cache.layers[0].keys, want[0][[2, 0]])
    with pytest.raises(ValueError, match="holds"):
        state.cache.update(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8), 0)  # 2 free positions, 3 asked
