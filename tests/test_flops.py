"""The training-FLOP estimate charges what ran: trunk tokens, the backward only below a trainable part, the head on
target positions only (direct formulas)."""

from __future__ import annotations

from peftlab.lab.results import estimate_training_flops

BODY, HEAD, TRUNK, TARGET = 1_000, 100, 50, 10


def test_adapter_in_the_trunk():
    # LoRA-like: 7 trainable body weights; forward + activation grads 4N, weight grads 2 x 7 per trunk token; the
    # frozen head runs forward and passes gradients down: 4 x head per target token.
    got = estimate_training_flops(BODY, HEAD, 7, TRUNK, TARGET)
    assert got == TRUNK * (4 * BODY + 2 * 7) + TARGET * 4 * HEAD


def test_frozen_trunk_with_a_trained_head():
    # last-layer (untied): forward only through the trunk; the head's forward and weight gradient per target token.
    got = estimate_training_flops(BODY, HEAD, HEAD, TRUNK, TARGET, frozen_trunk=True, head_trains=True)
    assert got == TRUNK * 2 * BODY + TARGET * 4 * HEAD


def test_full_fine_tuning_counts_each_weight_once():
    got = estimate_training_flops(BODY, HEAD, BODY + HEAD, TRUNK, TARGET, head_trains=True)
    assert got == TRUNK * 6 * BODY + TARGET * 6 * HEAD


def test_cached_trunk_tokens_are_not_charged_again():
    assert estimate_training_flops(BODY, HEAD, HEAD, 0, TARGET, frozen_trunk=True, head_trains=True) == (
        TARGET * 4 * HEAD)
