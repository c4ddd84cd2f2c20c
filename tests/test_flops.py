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


def test_frozen_bottom_blocks_run_forward_only():
    # last-blocks: 600 of the body's 1,000 weights are frozen blocks below 400 trained ones. Without the cache every
    # input token runs the frozen blocks forward (2 x 600) and the trained ones forward and backward (4 x 400 +
    # 2 x 400); with it the frozen blocks ran only for the first epoch's tokens.
    def flops(trunk_tokens: int) -> int:
        return estimate_training_flops(BODY, HEAD, 400, trunk_tokens, TARGET, frozen_body_params=600,
                                       input_tokens=3 * TRUNK)

    assert flops(3 * TRUNK) == 3 * TRUNK * (2 * 600 + 6 * 400) + TARGET * 4 * HEAD
    assert flops(TRUNK) == TRUNK * 2 * 600 + 3 * TRUNK * 6 * 400 + TARGET * 4 * HEAD
    assert flops(TRUNK) < flops(3 * TRUNK) < estimate_training_flops(BODY, HEAD, 400, 3 * TRUNK, TARGET)
