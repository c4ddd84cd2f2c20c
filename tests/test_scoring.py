"""Label scoring from one prompt pass (``score_continuations``) equals the per-(prompt, choice) sequence
log-probabilities it replaced (``sequence_log_probs``), for every registered method, on tiny GPT-2 and Llama."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, applied_method, method_family_cases

from peftlab.data.batching import collate
from peftlab.data.encode import EncodedExample
from peftlab.evaluation.generate import score_continuations
from peftlab.training.loss import IGNORE_INDEX, sequence_log_probs

pytestmark = pytest.mark.usefixtures("one_thread")

# Prompts of different lengths (left padding differs per row) and choices of 1, 2 and 3 tokens.
PROMPTS = [[5, 9, 17, 33, 40, 7], [11, 3], [60, 61, 62, 63], [8, 8, 8, 8, 8, 8, 8, 8, 2]]
CHOICES = [[21], [30, 1], [44, 45, 1]]


def reference_scores(method, prompts: list[list[int]], choices: list[list[int]]) -> torch.Tensor:
    """What evaluation computed before: one right-padded sequence per (prompt, choice), labels on the choice."""
    pairs = [EncodedExample(input_ids=p + c, labels=[IGNORE_INDEX] * len(p) + c) for p in prompts for c in choices]
    batch = collate(pairs, pad_id=1)
    inputs = method.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        return sequence_log_probs(method.model, inputs).view(len(prompts), len(choices))


@pytest.mark.parametrize(("name", "family"), method_family_cases())
def test_one_prompt_pass_equals_one_pass_per_choice(name, family):
    method = applied_method(name, family)
    got = score_continuations(method, PROMPTS, CHOICES, pad_id=1, device=torch.device("cpu"))
    expected = reference_scores(method, PROMPTS, CHOICES)
    assert got.shape == (len(PROMPTS), len(CHOICES))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (expected.max(dim=1).values - expected.min(dim=1).values).min() > 1e-3  # the choices differ
    # The cache is cropped back after each choice: scoring the choices in reverse order gives the same numbers.
    again = score_continuations(method, PROMPTS, CHOICES[::-1], pad_id=1, device=torch.device("cpu"))
    torch.testing.assert_close(again.flip(1), got, atol=1e-6, rtol=0)


def test_scores_are_log_probabilities_of_the_choice_tokens():
    """Direct formula on a base model: log p(a) + log p(b | a) from full-sequence logits."""
    method = applied_method("full", "llama")
    prompt, choice = [5, 9, 17], [30, 1]
    got = score_continuations(method, [prompt], [choice], pad_id=1, device=torch.device("cpu"))[0, 0]
    with torch.no_grad():
        logp = torch.log_softmax(method.model(input_ids=torch.tensor([prompt + choice])).logits[0], dim=-1)
    expected = logp[2, 30] + logp[3, 1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert VOCAB > 45
