"""The model passes greedy generation runs, worked out from the prompts' and outputs' lengths without a model.

:func:`generation_schedule` replays the loops of :mod:`peftlab.evaluation.generate` (continuous batching,
:func:`~peftlab.evaluation.generate.continuous_greedy_generate`; or one batch after another,
:func:`~peftlab.evaluation.generate.greedy_generate`) for prompts of known lengths whose outputs end after known
numbers of tokens, and returns every prompt pass (rows, padded positions) and every decode step (rows). The grid
estimate (:mod:`peftlab.lab.estimate`) prices these with rates that depend on the rows of a pass, because on a CPU a
one-row prompt pass or decode step costs far more per row than a full batch's.

:class:`PassTimer` is the other side: it records (and times) the passes the real loops run, which is how the tests
hold the replay to the loops, how the calibration (:mod:`peftlab.lab.calibrate`) measures its rates inside the
generation loop, and how ``benchmarks/generation_schedule.py`` shows where a run's generation time goes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Schedule:
    """Prompt passes as (rows, padded positions) and decode steps as rows per step (finished rows that stay in the
    batch count: they are computed on padding)."""

    passes: list[tuple[int, int]] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)


def generation_schedule(prompt_lengths: Sequence[int], new_tokens: Sequence[int], max_new_tokens: int,
                        batch_size: int, continuous: bool = True, refill_rows: int = 1,
                        drop_fraction: float = 0.25) -> Schedule:
    """The passes greedy generation runs over ``prompt_lengths`` (in the order the loop takes them: sorted by length)
    when prompt ``i``'s output is ``new_tokens[i]`` tokens long, eos not counted (``>= max_new_tokens``: it runs to
    the cap). Each prompt's first token comes from its prompt pass, every further one (and its eos) from a decode
    step. Same arguments as :func:`~peftlab.evaluation.generate.continuous_greedy_generate`."""
    if len(prompt_lengths) != len(new_tokens):
        raise ValueError(f"{len(prompt_lengths)} prompt lengths but {len(new_tokens)} output lengths")
    # tokens each prompt receives: its output and then eos, or max_new_tokens at the cap
    received = [min(n, max_new_tokens - 1) + 1 if max_new_tokens > 0 else 0 for n in new_tokens]
    schedule = Schedule()
    if not prompt_lengths:
        return schedule
    if continuous:
        _continuous(prompt_lengths, received, batch_size, refill_rows, drop_fraction, schedule)
    else:
        for start in range(0, len(prompt_lengths), batch_size):
            _one_batch(prompt_lengths[start:start + batch_size], received[start:start + batch_size], schedule)
    return schedule


def _continuous(lengths: Sequence[int], received: Sequence[int], batch_size: int, refill_rows: int,
                drop_fraction: float, schedule: Schedule) -> None:
    queue = deque(range(len(lengths)))
    first = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
    schedule.passes.append((len(first), len(first) * max(lengths[i] for i in first)))
    left = [received[i] - 1 for i in first]  # tokens each row still needs (its first came from the prompt pass)
    live = [n > 0 for n in left]
    while True:
        while queue and len(free := [r for r, on in enumerate(live) if not on]) >= min(refill_rows, len(live),
                                                                                      len(queue)):
            newcomers = [queue.popleft() for _ in range(min(len(free), len(queue)))]
            schedule.passes.append((len(newcomers), len(newcomers) * max(lengths[i] for i in newcomers)))
            for row, i in zip(free, newcomers, strict=False):
                left[row], live[row] = received[i] - 1, received[i] > 1
        if not any(live):
            return
        finished = len(live) - sum(live)
        if not queue and drop_fraction > 0 and finished and finished >= max(1.0, drop_fraction * len(live)):
            left = [n for n, on in zip(left, live, strict=True) if on]
            live = [True] * len(left)
        schedule.steps.append(len(live))
        for row, on in enumerate(live):
            if on:
                left[row] -= 1
                live[row] = left[row] > 0


def _one_batch(lengths: Sequence[int], received: Sequence[int], schedule: Schedule) -> None:
    """:func:`~peftlab.evaluation.generate.greedy_generate`, as an upper bound: every row decoded until the batch's
    longest output ends. (The loop drops finished rows once they are a quarter of the batch, but whether a row it
    kept on padding counts as finished depends on what the model predicts after padding, which no replay knows.)"""
    schedule.passes.append((len(lengths), len(lengths) * max(lengths)))
    schedule.steps += [len(lengths)] * (max(received) - 1)


class PassTimer:
    """Within ``with PassTimer() as timer:``, every prompt pass and decode step that the loops of
    :mod:`peftlab.evaluation.generate` run is recorded with its wall time: ``timer.prefills`` holds (rows, padded
    prompt positions, seconds), ``timer.decodes`` (rows, seconds), in the order they ran.

    It wraps the module's ``prefill`` and ``decode_step`` (the loops look them up at each call) and puts them back on
    exit. Positions are counted as the replay counts them: a method's virtual positions (soft prompt, prefix) are
    not included. Work on a CPU is synchronous, so a timer around a call is the call's time; on an accelerator the
    times would need a synchronisation first.
    """

    def __init__(self) -> None:
        self.prefills: list[tuple[int, int, float]] = []
        self.decodes: list[tuple[int, float]] = []
        self._saved: tuple[Any, Any] | None = None

    def schedule(self) -> Schedule:
        """What ran, as the replay writes it."""
        return Schedule([(rows, positions) for rows, positions, _ in self.prefills],
                        [rows for rows, _ in self.decodes])

    def __enter__(self) -> PassTimer:
        import peftlab.evaluation.generate as gen

        prefill, decode_step = self._saved = gen.prefill, gen.decode_step

        def timed_prefill(method: Any, prompts: Sequence[Sequence[int]], *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            state = prefill(method, prompts, *args, **kwargs)
            self.prefills.append((len(prompts), len(prompts) * max(len(p) for p in prompts),
                                  time.perf_counter() - t0))
            return state

        def timed_decode_step(model: Any, input_ids: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            logits = decode_step(model, input_ids, *args, **kwargs)
            self.decodes.append((input_ids.shape[0], time.perf_counter() - t0))
            return logits

        gen.prefill, gen.decode_step = timed_prefill, timed_decode_step
        return self

    def __exit__(self, *exc: object) -> None:
        import peftlab.evaluation.generate as gen

        assert self._saved is not None
        gen.prefill, gen.decode_step = self._saved
