"""`peftlab compare GRID --estimate`: each run's wall time on this machine, predicted before any run starts.

A run's time is the work it will do, counted from its own examples, divided by rates measured on this machine::

    train       sum over micro-batches of B_i * (T_i + v) / r_train    # padded positions through forward+backward+step
                (+ with the frozen-trunk cache: later epochs' target tokens / r_head, the head alone)
    evaluation  sum over prompt passes of B * (T + v) / r_prefill(B)   # scoring, generation prefill, val. loss
                + sum over decode steps of t_decode(B)                 # generated tokens, label continuations
    overhead    model load + reading/tokenizing its data + checkpoint saves * s_save

Work (:func:`count_run`): the run's training, validation and test examples are loaded and tokenized exactly as
:mod:`peftlab.lab.experiment` does (same splits, sample, :class:`~peftlab.data.encode.PromptEncoder`); training
micro-batches are the trainer's own length-bucketed batches, epoch by epoch, for the trainer's own step count
(``max_steps``, else ``epochs`` but at least ``min_steps``);
validations come every ``eval_every`` steps and at the end; evaluation runs the task's own ``evaluate`` with a
:class:`CountingPredictor`, which runs no model but counts the prompt passes and decode steps that
:class:`~peftlab.evaluation.generate.ModelPredictor` would run, each with its rows. Generation is replayed pass by
pass (:mod:`peftlab.evaluation.schedule`: continuous batching refills freed rows, often one prompt at a time, and a
batch's last rows decode alone), for outputs as long as each example's training target in a trained run and at
``max_new_tokens`` in a zero-shot run (whose output length nothing predicts; an upper bound). Early stopping
(``patience``) is not predicted.

Rates (:mod:`peftlab.lab.calibrate`): measured once per method family of the grid (method + options +
precision) with the method's own training step and evaluation passes; prompt passes and decode steps at the grid's
``eval.batch_size`` and at one row (r_prefill(B) between the two in log B; t_decode(B) linear in B: a decode step
reads every weight however few its rows). ``v``: virtual positions a method prepends
(prompt tuning), measured through its ``prepare_inputs``.

Everything measured is cached in ``<results>/<name>/estimate/cache.json`` (rates keyed by CPU, torch threads, device,
model, precision, method and shapes; counts keyed by the settings they depend on), so a second estimate of the same
grid on the same machine runs nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.lab.calibrate import CACHE_VERSION, Family, Rates, measure_family

CACHE_NAME = "estimate/cache.json"  # a folder: the results folder itself holds only results
PREDICTED_NAME = "estimate/predicted.json"  # {stem: {"predicted_seconds", "predicted_at"}}: what the report reads
ZERO_SHOT, LEAD_3 = "zero-shot", "lead-3"  # the grid's baseline kinds (peftlab.lab.compare_grid)
# Settings a run's counts do not depend on (dropped from the counts' cache key).
_NOT_COUNTED = {"train": ("lr", "weight_decay", "schedule", "warmup_steps", "warmup_ratio", "max_grad_norm", "bf16",
                          "gradient_checkpointing", "release_freed_memory", "log_every", "device", "skip_nonfinite",
                          "patience"),
                "eval": ("show_examples",)}


COUNTS_VERSION = 4  # bump when what is counted changes: counts are redone (2: the forgetting passes; 3: min_steps;
# 4: passes by rows, generation replayed with continuous batching and trained runs' expected output lengths)


class EstimateError(ValueError):
    """A grid whose time cannot be estimated (the message names the run and the cause)."""


# ----------------------------------------------------------------------------------------------- counting


@dataclass
class Work:
    """What one run will compute, in positions (tokens incl. padding) and rows (sequences), before any method's
    virtual positions are added."""

    train_tokens: int = 0            # real input tokens of all micro-batches (what the trainer's tok/s counts)
    train_positions: int = 0         # padded positions of first-epoch micro-batches (the trunk always runs)
    train_rows: int = 0
    later_positions: int = 0         # micro-batches of later epochs: the trunk runs unless the trunk cache serves them
    later_rows: int = 0
    later_targets: int = 0           # their target tokens (what the head alone costs when cached)
    all_targets: int = 0             # target tokens of the training set (the cache's size decision)
    train_examples: int = 0
    steps: int = 0
    saves: int = 0
    eval_positions: int = 0          # prompt passes: validation loss, scoring, generation prefill
    eval_rows: int = 0
    decode_rows: int = 0             # row-steps of decoding (and of label-continuation passes)
    data_seconds: float = 0.0        # reading + tokenizing the run's data (measured while counting)
    # the same passes by their rows, which set their rate: {rows: [passes, positions]} and {rows: decode steps}
    prompt_passes: dict[str, list[int]] = field(default_factory=dict)
    decode_steps: dict[str, int] = field(default_factory=dict)

    def prompt_pass(self, rows: int, positions: int, times: int = 1) -> None:
        """Count ``times`` prompt passes of ``rows`` rows and ``positions`` padded positions each."""
        self._passes(rows, times, times * positions)

    def decode(self, rows: int, steps: int = 1) -> None:
        """Count ``steps`` decode steps (or label-continuation positions) of ``rows`` rows."""
        self.decode_rows += rows * steps
        self.decode_steps[str(rows)] = self.decode_steps.get(str(rows), 0) + steps

    def add(self, other: Work, times: int = 1) -> None:
        """Add ``other``'s evaluation passes ``times`` over (its training counts are not added)."""
        for rows, (passes, positions) in other.prompt_passes.items():
            self._passes(int(rows), times * passes, times * positions)
        for rows, steps in other.decode_steps.items():
            self.decode(int(rows), times * steps)

    def _passes(self, rows: int, passes: int, positions: int) -> None:
        self.eval_positions += positions
        self.eval_rows += passes * rows
        entry = self.prompt_passes.setdefault(str(rows), [0, 0])
        entry[0], entry[1] = entry[0] + passes, entry[1] + positions


class CountingPredictor:
    """A :class:`~peftlab.tasks.base.Predictor` that runs no model: it counts the prompt passes and decode steps that
    :class:`~peftlab.evaluation.generate.ModelPredictor` runs on the same examples (same prompts, sorted by length)
    and returns empty predictions (scores of 0).

    Generation is replayed pass by pass (:func:`~peftlab.evaluation.schedule.generation_schedule`: continuous
    batching's refills, the rows a batch drops at its end) for outputs of ``output_tokens(example)`` tokens, or
    ``max_new_tokens`` each when it is None (every row runs to the cap: an upper bound, and the rows then end
    together, so refills come as whole batches). Beam search counts whole batches decoded to the cap."""

    def __init__(self, encoder: Any, batch_size: int, num_beams: int = 1, continuous: bool = True,
                 refill_rows: int = 1, output_tokens: Callable[[Sequence[Any]], list[int]] | None = None) -> None:
        self.encoder, self.batch_size, self.num_beams = encoder, batch_size, num_beams
        self.continuous, self.refill_rows, self.output_tokens = continuous, refill_rows, output_tokens
        self.work = Work()

    def _sorted(self, examples: Sequence[Any]) -> tuple[list[int], list[int]]:
        """The prompts' lengths in the order the predictor takes them (by length), and that order."""
        prompts = self.encoder.encode_prompts(list(examples))
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        return [len(prompts[i]) for i in order], order

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        return [lengths[i:i + self.batch_size] for i in range(0, len(lengths), self.batch_size)]

    def generate(self, examples: Sequence[Any], max_new_tokens: int) -> list[str]:
        from peftlab.evaluation.schedule import generation_schedule

        lengths, order = self._sorted(examples)
        if self.num_beams > 1:
            for batch in self._batches(lengths):
                self.work.prompt_pass(len(batch), len(batch) * max(batch))  # left-padded to its longest prompt
                self.work.decode(len(batch) * self.num_beams, max(max_new_tokens - 1, 0))
            return [""] * len(examples)
        outputs = self.output_tokens(examples) if self.output_tokens else [max_new_tokens] * len(examples)
        schedule = generation_schedule(lengths, [outputs[i] for i in order], max_new_tokens, self.batch_size,
                                       continuous=self.continuous, refill_rows=self.refill_rows)
        for rows, positions in schedule.passes:
            self.work.prompt_pass(rows, positions)
        for rows in schedule.steps:
            self.work.decode(rows)
        return [""] * len(examples)

    def score_choices(self, examples: Sequence[Any], choices: Sequence[str]) -> list[list[float]]:
        continuation = sum(len(ids) - 1 for ids in self.encoder.encode_targets(list(choices)))
        for batch in self._batches(self._sorted(examples)[0]):
            self.work.prompt_pass(len(batch), len(batch) * max(batch))
            self.work.decode(len(batch), continuation)  # one (B, L-1) pass per label on the prompt cache
        return [[0.0] * len(choices) for _ in examples]


def trained_output_tokens(encoder: Any) -> Callable[[Sequence[Any]], list[int]]:
    """Each example's expected output length for a trained run: its training target's tokens (eos not counted);
    a trained model writes outputs of about the length it was trained to."""
    return lambda examples: [len(ids) - 1 for ids in encoder.encode_targets([e.target for e in examples])]


def _eval_work(task: Any, encoder: Any, cfg: Any, examples: list[Any], trained: bool) -> Work:
    ev = cfg.eval
    predictor = CountingPredictor(encoder, ev.batch_size, ev.num_beams, ev.continuous_batching, ev.refill_rows,
                                  trained_output_tokens(encoder) if trained else None)
    task.evaluate(predictor, examples, ev.max_new_tokens)
    return predictor.work


def _train_work(cfg: Any, encoded: list[Any], work: Work) -> None:
    """The trainer's micro-batches (length-bucketed, epoch by epoch) up to its last step, and its saves."""
    from peftlab.data.batching import length_bucketed_batches
    from peftlab.data.encode import IGNORE_INDEX
    from peftlab.training.trainer import planned_steps

    t = cfg.train
    lengths = [len(e.input_ids) for e in encoded]
    targets = [sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in encoded]
    per_epoch = math.ceil(len(encoded) / t.batch_size)
    work.steps = planned_steps(t, len(encoded))
    work.all_targets, work.train_examples = sum(targets), len(encoded)
    micro, epoch = work.steps * t.grad_accum, 0
    while micro > 0:
        for batch in length_bucketed_batches(lengths, t.batch_size, t.seed, epoch, t.length_bucketing)[:micro]:
            positions, rows = len(batch) * max(lengths[i] for i in batch), len(batch)
            work.train_tokens += sum(lengths[i] for i in batch)
            if epoch == 0:
                work.train_positions, work.train_rows = work.train_positions + positions, work.train_rows + rows
            else:
                work.later_positions, work.later_rows = work.later_positions + positions, work.later_rows + rows
                work.later_targets += sum(targets[i] for i in batch)
        micro -= per_epoch
        epoch += 1


def _validation_steps(cfg: Any, steps: int) -> list[int]:
    every = cfg.train.eval_every
    return [s for s in range(1, steps + 1) if (every and s % every == 0) or s == steps]


def count_run(run: Any, tokenizer: Any, load: SplitReader) -> Work:
    """The work of one planned run (see the module docstring); ``load`` reads its splits (:class:`SplitReader`).

    Raises:
        EstimateError: the run's data cannot be read or encoded (the message names the run).
    """
    from peftlab.data.encode import PromptEncoder
    from peftlab.tasks import get_task

    cfg, work = run.cfg, Work()
    if run.kind == LEAD_3:  # derived from the zero-shot run's output: no model runs
        return work
    t0, load.charged, load.spent = time.perf_counter(), 0.0, 0.0
    try:
        task = get_task(cfg.task)
        encoder = PromptEncoder(tokenizer, task, cfg.task)
        if run.kind == ZERO_SHOT:
            if task.needs_train_labels and not cfg.task.labels:
                task.fit_labels(load(cfg, task, "train", None, None))
        else:
            train = load(cfg, task, "train", cfg.data.max_train, cfg.data.seed)
            task.fit_labels(train)
            val = load(cfg, task, "validation", cfg.data.max_validation, None)
            _train_work(cfg, encoder.encode_many(train), work)
            checks = _validation_steps(cfg, work.steps) if val else []
            saves = set(checks) | {work.steps}
            if cfg.train.save_every:
                saves |= set(range(cfg.train.save_every, work.steps + 1, cfg.train.save_every))
            work.saves = len(saves)
            loss_pass = Work()
            lengths = sorted(len(e.input_ids) for e in encoder.encode_many(val))
            for i in range(0, len(lengths), cfg.train.batch_size):
                batch = lengths[i:i + cfg.train.batch_size]
                loss_pass.prompt_pass(len(batch), len(batch) * max(batch))
            work.add(loss_pass, len(checks))
            if checks and cfg.train.eval_examples > 0:
                work.add(_eval_work(task, encoder, cfg, val[:cfg.train.eval_examples], True), len(checks))
        for split in cfg.eval.splits:
            role = "test" if split in ("test", cfg.data.test_split) else "validation"
            limit = cfg.data.max_test if role == "test" else cfg.data.max_validation
            work.add(_eval_work(task, encoder, cfg, load(cfg, task, split, limit, None), run.kind != ZERO_SHOT))
        if cfg.eval.forgetting_data is not None:  # before training (train runs) and after
            work.add(load.forgetting(cfg, tokenizer), 1 if run.kind == ZERO_SHOT else 2)
    except (OSError, ValueError) as exc:
        raise EstimateError(f"estimate: run {run.stem}: {exc}") from exc
    work.data_seconds = time.perf_counter() - t0 - load.spent + load.charged
    return work


class SplitReader:
    """``reader(cfg, task, role, limit, seed)``: the examples ``experiment`` reads for a split role (or split name),
    memoised so runs sharing a split read it once; ``charged`` adds up the reading time each call would have cost
    (a real run reads its splits itself), ``spent`` the time actually spent."""

    def __init__(self) -> None:
        self.memo: dict[tuple, tuple[list[Any], float]] = {}
        self.charged = self.spent = 0.0

    def __call__(self, cfg: Any, task: Any, role: str, limit: int | None, seed: int | None) -> list[Any]:
        from peftlab.data.dataset import load_examples

        data = cfg.data
        split = {"train": data.train_split, "validation": data.validation_split, "test": data.test_split}.get(
            role, role)
        key = (json.dumps(dataclasses.asdict(data), sort_keys=True, default=str), split, limit, seed,
               json.dumps(dataclasses.asdict(cfg.task), sort_keys=True, default=str))
        if key not in self.memo:
            t0 = time.perf_counter()
            examples = load_examples(data, task, split, limit=limit, sample_seed=seed)[0]
            self.memo[key] = examples, time.perf_counter() - t0
            self.spent += self.memo[key][1]
        self.charged += self.memo[key][1]
        return self.memo[key][0]

    def forgetting(self, cfg: Any, tokenizer: Any) -> Work:
        """One pass of the forgetting cross-entropy (:mod:`peftlab.evaluation.forgetting`): its length-sorted
        batches of the sampled, cut texts."""
        from peftlab.evaluation import forgetting as f

        ev = cfg.eval
        key = ("forgetting", ev.forgetting_data, ev.forgetting_split, ev.forgetting_field, ev.forgetting_examples,
               ev.forgetting_tokens)
        if key not in self.memo:
            t0 = time.perf_counter()
            texts = f.forgetting_texts(ev.forgetting_data, ev.forgetting_split, ev.forgetting_field,
                                       ev.forgetting_examples)
            lengths = sorted(len(ids) for ids in f.encode_texts(tokenizer, texts, ev.forgetting_tokens))
            work = Work()
            for i in range(0, len(lengths), f.BATCH_SIZE):
                batch = lengths[i:i + f.BATCH_SIZE]
                work.prompt_pass(len(batch), len(batch) * max(batch))
            self.memo[key] = [work], time.perf_counter() - t0
            self.spent += self.memo[key][1]
        self.charged += self.memo[key][1]
        return self.memo[key][0][0]


# ----------------------------------------------------------------------------------------------- prediction


def _round_up(value: float, step: int = 32) -> int:
    return max(step, int(math.ceil(value / step) * step))


def _uses_trunk_cache(cfg: Any, work: Work, rates: Rates) -> bool:
    from peftlab.config import cache_frozen_trunk_mode
    from peftlab.training.trunk_cache import AUTO_LIMIT_BYTES

    mode = cache_frozen_trunk_mode(cfg.train.cache_frozen_trunk)
    if mode == "off" or not rates.cache_bytes_per_target or not rates.head_targets_per_s:
        return False
    return mode == "on" or rates.cache_bytes_per_target * work.all_targets <= AUTO_LIMIT_BYTES


def predict_seconds(cfg: Any, work: Work, train: Rates | None, evaluation: Rates) -> dict[str, float]:
    """A run's predicted seconds by part (train, evaluation, overhead) and in total."""
    own = train or evaluation
    v = own.virtual_positions
    parts = {"train": 0.0, "evaluation": 0.0, "overhead": 0.0}
    if work.eval_rows or work.train_rows:
        parts["overhead"] = own.load_seconds + work.data_seconds + work.saves * own.save_seconds
    if train is not None and work.train_rows:
        parts["train"] = (work.steps * train.update_seconds
                          + (work.train_positions + v * work.train_rows) / train.train_positions_per_s)
        if _uses_trunk_cache(cfg, work, train):
            parts["train"] += work.later_targets / train.head_targets_per_s
        else:
            parts["train"] += (work.later_positions + v * work.later_rows) / train.train_positions_per_s
    if work.eval_rows:
        parts["evaluation"] = evaluation_seconds(work, evaluation)
    parts["total"] = sum(parts.values())
    return parts


def evaluation_seconds(work: Work, rates: Rates) -> float:
    """The evaluation passes of ``work`` priced by their rows: a prompt pass of r rows at a rate between the
    one-row and the full-batch rate (interpolated in log r), a decode step of r rows at a time linear in r between
    the one-row and the full-batch step (a step reads every weight however few its rows), plus the generation loop's
    own work per decode step (a label-continuation position of classification, counted as a decode step, pays it
    too: a few milliseconds per batch)."""
    v, full = rates.virtual_positions, max(1, rates.eval_rows)
    seconds = 0.0
    for rows, (passes, positions) in work.prompt_passes.items():
        seconds += (positions + v * passes * int(rows)) / _prefill_rate(rates, int(rows), full)
    for rows, steps in work.decode_steps.items():
        seconds += steps * (_decode_step_seconds(rates, int(rows), full) + rates.loop_step_seconds)
    return seconds


def _prefill_rate(rates: Rates, rows: int, full: int) -> float:
    one, many = rates.prefill_one_positions_per_s, rates.prefill_positions_per_s
    if not one or full <= 1 or rows >= full:
        return many
    share = math.log(max(rows, 1)) / math.log(full)
    return math.exp(math.log(one) + share * (math.log(many) - math.log(one)))


def _decode_step_seconds(rates: Rates, rows: int, full: int) -> float:
    many = full / rates.decode_rows_per_s  # one step of `full` rows
    if not rates.decode_one_rows_per_s or full <= 1:
        return rows / rates.decode_rows_per_s
    one = 1.0 / rates.decode_one_rows_per_s
    return one + (many - one) * (rows - 1) / (full - 1)


@dataclass
class RunEstimate:
    stem: str
    kind: str
    work: Work
    seconds: dict[str, float]
    todo: bool  # the run will run in this invocation (not done earlier)
    evaluation_rates: Rates | None = None  # the rates its evaluation was predicted with (None: not predicted)


@dataclass
class GridEstimate:
    runs: list[RunEstimate]
    calibrated: list[str] = field(default_factory=list)  # families measured in this call
    calibration_seconds: float = 0.0

    @property
    def total_seconds(self) -> float:
        return sum(r.seconds["total"] for r in self.runs if r.todo)


def _counts_key(cfg: Any, kind: str) -> str:
    data = cfg.to_dict()
    for key in ("method", "out", "resume", "adapter"):
        data.pop(key, None)
    for section, keys in _NOT_COUNTED.items():
        data[section] = {k: v for k, v in data[section].items() if k not in keys}
    data["kind"] = ZERO_SHOT if kind == ZERO_SHOT else LEAD_3 if kind == LEAD_3 else "train"
    data["v"] = (CACHE_VERSION, COUNTS_VERSION)
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_cache(path: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The estimate cache, or an empty one when it is missing or unreadable (said once: it is only a cache)."""
    empty: dict[str, Any] = {"version": CACHE_VERSION, "rates": {}, "counts": {}}
    if not path.exists():
        return empty
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log(f"[estimate] {path}: unreadable ({exc}); measuring again")
        return empty
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        log(f"[estimate] {path}: from another version of the estimator; measuring again")
        return empty
    return {**empty, **data}


def _tokenizer(model_cfg: Any) -> Any:
    from transformers import AutoTokenizer

    from peftlab.models.loading import pretrained_source

    return AutoTokenizer.from_pretrained(pretrained_source(model_cfg.name),
                                         trust_remote_code=model_cfg.trust_remote_code)


def _shapes(pairs: list[tuple[Any, Work]]) -> tuple[int, int, int]:
    """(train length, targets, prompt length) of the grid: means over its training and evaluation batches."""
    rows = sum(w.train_rows + w.later_rows for _, w in pairs)
    positions = sum(w.train_positions + w.later_positions for _, w in pairs)
    targets = sum(w.all_targets for _, w in pairs)
    examples = sum(w.train_examples for _, w in pairs)
    prompts = sum(w.eval_positions for _, w in pairs) / max(1, sum(w.eval_rows for _, w in pairs))
    return (_round_up(positions / rows) if rows else 64, max(1, round(targets / examples)) if examples else 8,
            _round_up(prompts) if prompts else 64)


def estimate_grid(runs: Sequence[Any], cache_path: Path, statuses: Sequence[str] | None = None,
                  measure: Callable[[Family], Rates] | None = None, log: Callable[[str], None] = print,
                  write_cache: bool = True) -> GridEstimate:
    """Count every run's work, measure the rates it needs (cached) and predict each run's seconds.

    Args:
        runs: planned runs (:func:`peftlab.lab.compare.plan`).
        cache_path: the estimate cache (``<results>/<name>/estimate/cache.json``).
        statuses: each run's status (``done`` runs are listed but need no rates); None: all to run.
        measure: measures a family's rates (default :func:`measure_family`; tests pass a stand-in).
        log: progress lines (calibrations).
        write_cache: store what was counted and measured.
    """
    statuses = list(statuses or ["new"] * len(runs))
    measure = measure or measure_family
    cache = read_cache(cache_path, log)
    load, tokenizers = SplitReader(), {}
    pairs: list[tuple[Any, Work]] = []
    for run in runs:
        key = _counts_key(run.cfg, run.kind)
        if key not in cache["counts"]:
            name = run.cfg.model.name
            if name not in tokenizers:
                tokenizers[name] = _tokenizer(run.cfg.model)
            cache["counts"][key] = dataclasses.asdict(count_run(run, tokenizers[name], load))
        pairs.append((run, Work(**cache["counts"][key])))
    train_len, targets, prompt_len = _shapes(pairs)
    estimate = GridEstimate([])

    def rates_for(cfg: Any, train: bool) -> Rates:
        family = Family(cfg, train, train_len, targets, prompt_len)
        key = family.key()
        if key not in cache["rates"]:
            what = f"{cfg.method.name} {json.dumps(cfg.method.options)}" if train else "the base model"
            log(f"[estimate] calibrating {what} on this machine ...")
            with contextlib.redirect_stderr(io.StringIO()):  # the trainer's progress bar and notes
                rates = measure(family)
            cache["rates"][key] = dataclasses.asdict(rates)
            estimate.calibrated.append(what)
            estimate.calibration_seconds += rates.calibration_seconds
        return Rates(**cache["rates"][key])

    for (run, work), status in zip(pairs, statuses, strict=True):
        evaluation = None
        if status == "done" or run.kind == LEAD_3:
            seconds = {"train": 0.0, "evaluation": 0.0, "overhead": 0.0, "total": 0.0}
        else:
            train = rates_for(run.cfg, True) if run.kind != ZERO_SHOT else None
            evaluation = train if train is not None and not train.eval_as_base else rates_for(run.cfg, False)
            if train is not None and train.eval_as_base:
                evaluation = dataclasses.replace(evaluation, virtual_positions=train.virtual_positions)
            seconds = predict_seconds(run.cfg, work, train, evaluation)
        estimate.runs.append(RunEstimate(run.stem, run.kind, work, seconds, status != "done", evaluation))
    if write_cache:
        from peftlab.durable import atomic_write_json

        atomic_write_json(cache_path, cache)
    return estimate


# ----------------------------------------------------------------------------------------------- output


def format_duration(seconds: float) -> str:
    """``42s``, ``17m``, ``3h05m``."""
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


def finish_line(total: float, now: float | None = None) -> str:
    now = time.time() if now is None else now
    return (f"predicted total {format_duration(total)} on this machine; expected finish "
            f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(now + total))}")


def estimate_table(estimate: GridEstimate) -> str:
    """One line per run (kind, tokens trained on, tokens evaluated, decode steps, predicted time) and the total."""
    header = ["run", "kind", "train tok", "eval tok", "decode", "predicted"]
    rows = [header]
    for r in estimate.runs:
        w = r.work
        rows.append([r.stem, r.kind, f"{w.train_tokens:,}", f"{w.eval_positions:,}", f"{w.decode_rows:,}",
                     format_duration(r.seconds["total"]) if r.todo else "done"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                          strict=True))).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    note = (f" (calibrated {len(estimate.calibrated)} famil{'y' if len(estimate.calibrated) == 1 else 'ies'} in "
            f"{estimate.calibration_seconds:.0f}s)" if estimate.calibrated else " (rates from the cache)")
    return "\n".join([*lines, "", finish_line(estimate.total_seconds) + note])


def _statuses(runs: Sequence[Any], status: Callable[[Any], str] | None) -> list[str]:
    return [status(r) for r in runs] if status is not None else ["new"] * len(runs)


def print_estimate(runs: Sequence[Any], root: Path, status: Callable[[Any], str] | None = None) -> GridEstimate:
    """``peftlab compare GRID --estimate``: the table of :func:`estimate_table`; runs nothing else."""
    estimate = estimate_grid(runs, Path(root) / CACHE_NAME, _statuses(runs, status))
    print(estimate_table(estimate))
    return estimate


def predict_for_grid(runs: Sequence[Any], root: Path, status: Callable[[Any], str] | None = None,
                     log: Callable[[str], None] = print) -> GridEstimate | None:
    """Before a grid starts: print the predicted total and finish time, and record each run's prediction in
    ``<root>/estimate/predicted.json`` (``{stem: {predicted_seconds, predicted_at}}``), which ``peftlab report``
    sets against the run's actual time. An estimate that fails says why and returns None: the grid runs all the
    same. Skipped under a multi-process launch (one process's rates would not describe it)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return None
    try:
        estimate = estimate_grid(runs, Path(root) / CACHE_NAME, _statuses(runs, status), log=log)
    except Exception as exc:  # noqa: BLE001  the estimate is advice: it never stops a grid
        log(f"[estimate] no estimate for this grid: {exc}")
        return None
    from peftlab.durable import atomic_write_json

    path = Path(root) / PREDICTED_NAME
    try:
        recorded = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        recorded = {}
    # Shards starting at the same moment could each write this file from the same old copy and lose the other's
    # lines; the predictions are advice, so that is left as it is (each shard's own runs are then unpredicted).
    now = time.time()
    recorded.update({p.stem: {"predicted_seconds": round(p.seconds["total"], 1), "predicted_at": now}
                     for p in estimate.runs if p.todo})
    atomic_write_json(path, recorded)
    log(f"[estimate] {finish_line(estimate.total_seconds)} (`--estimate` lists every run)")
    return estimate
