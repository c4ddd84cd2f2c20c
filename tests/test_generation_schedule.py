"""The replay of greedy generation's passes (:func:`peftlab.evaluation.schedule.generation_schedule`), which the grid
estimate prices, runs the same prompt passes (rows, padded positions) and decode steps (rows) as the real loops,
given the lengths of the outputs they produced."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from test_generation_continuous import PROMPTS, STEPS, eos_for_varied_lengths, varied

import peftlab.evaluation.generate as gen
from peftlab.evaluation.generate import decode_step, prefill
from peftlab.evaluation.schedule import PassTimer, generation_schedule
from peftlab.methods.base import BaseModelHandle

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def recorded_passes(method, prompts, eos_ids, **kwargs):
    """The real loop's outputs and the passes it ran (prompt passes and decode steps, as the replay writes them)."""
    with PassTimer() as timer:
        outputs = gen.continuous_greedy_generate(method, prompts, pad_id=1, eos_ids=eos_ids, max_new_tokens=STEPS,
                                                 device=CPU, **kwargs)
    assert gen.prefill is prefill and gen.decode_step is decode_step, "the timer puts the loop's functions back"
    return outputs, timer.schedule()


@pytest.mark.parametrize("batch_size", [1, 3, 4, 16])
@pytest.mark.parametrize("refill_rows", [1, 2, 3])
@pytest.mark.parametrize("drop_fraction", [0.0, 0.25, 1.0])
def test_replay_runs_the_passes_of_continuous_batching(batch_size, refill_rows, drop_fraction):
    method = varied(BaseModelHandle(tiny_llama()))
    prompts = sorted(PROMPTS, key=len)  # as ModelPredictor orders them
    eos_ids = eos_for_varied_lengths(method, prompts)
    outputs, ran = recorded_passes(method, prompts, eos_ids, batch_size=batch_size, refill_rows=refill_rows,
                                   drop_fraction=drop_fraction)
    lengths = [len(row) for row in outputs]
    assert len(set(lengths)) >= 4 and STEPS in lengths, "some rows should end early, some at the cap"
    replay = generation_schedule([len(p) for p in prompts], lengths, STEPS, batch_size, continuous=True,
                                 refill_rows=refill_rows, drop_fraction=drop_fraction)
    assert replay.passes == ran.passes
    assert replay.steps == ran.steps


def test_outputs_ending_at_the_first_token_and_at_the_cap():
    # 3 rows; prompt 0 ends at its first token (eos right away), prompts 1-3 run to the cap of 4 (3 decode steps)
    replay = generation_schedule([2, 3, 5, 5], [0, 9, 4, 4], 4, batch_size=3)
    assert replay.passes == [(3, 15), (1, 5)]  # the freed row is refilled before the first decode step
    assert replay.steps == [3, 3, 3]
    one_by_one = generation_schedule([2, 3], [1, 1], 4, batch_size=1)
    assert one_by_one.passes == [(1, 2), (1, 3)] and one_by_one.steps == [1, 1]


def test_one_batch_after_another_is_an_upper_bound():
    replay = generation_schedule([2, 3, 4, 6, 7], [1, 5, 2, 3, 0], 8, batch_size=2, continuous=False)
    assert replay.passes == [(2, 6), (2, 12), (1, 7)]
    assert replay.steps == [2] * 5 + [2] * 3  # the last batch's only row ends at its first token


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="3 prompt lengths but 2 output lengths"):
        generation_schedule([1, 2, 3], [1, 2], 4, batch_size=2)


def test_pass_timer_times_every_pass_and_restores_the_loop_after_an_error():
    method = varied(BaseModelHandle(tiny_llama()))
    with pytest.raises(RuntimeError, match="stop"), PassTimer() as timer:
        gen.greedy_generate(method, PROMPTS[:2], pad_id=1, eos_ids=set(), max_new_tokens=3, device=CPU)
        raise RuntimeError("stop")
    assert gen.prefill is prefill and gen.decode_step is decode_step
    longest = max(len(p) for p in PROMPTS[:2])
    assert [(rows, positions) for rows, positions, _ in timer.prefills] == [(2, 2 * longest)]
    assert [rows for rows, _ in timer.decodes] == [2, 2]
    assert all(seconds > 0 for *_, seconds in [*timer.prefills, *timer.decodes])


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_outputs_of_given_lengths_run_the_replayed_passes(batch_size):
    """``ends`` makes each prompt's output end at a given length (how the estimate's calibration runs the loop):
    the outputs have those lengths (or the cap), and the loop runs the passes the replay counts for them."""
    method = varied(BaseModelHandle(tiny_llama()))
    prompts = sorted(PROMPTS, key=len)
    ends = [0, 3, 9, 1, 12, 5, 2, 7, 4, 6]  # 0: eos first; 9 and 12: at the cap of STEPS (10)
    outputs, ran = recorded_passes(method, prompts, set(), batch_size=batch_size, ends=ends)
    assert [len(row) for row in outputs] == [min(n, STEPS) for n in ends]
    replay = generation_schedule([len(p) for p in prompts], ends, STEPS, batch_size)
    assert (replay.passes, replay.steps) == (ran.passes, ran.steps)
