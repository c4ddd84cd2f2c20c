"""The rates a grid estimate divides its counted work by (:mod:`peftlab.lab.estimate`), measured on this machine.

For each method family (method + options + precision) once: the method's own training step (the
:class:`~peftlab.training.trainer.Trainer`, on micro-batches of ``train.batch_size`` synthetic sequences of the grid's
mean length, after a warm-up step of that shape), the optimizer update every step pays, a checkpoint save, and the
evaluation's generation loop on ``eval.batch_size`` prompts of the grid's mean prompt length and on one row (its
prompt passes, decode steps and own work timed inside it, :func:`_measure_evaluation`), under the run's own
precision (``train.bf16``, ``model.dtype``). Rates are measured at the grid's own batch sizes because on a CPU they
depend on them: on a 2-core Xeon, LoRA on SmolLM2-135M (bf16, one thread) trained 193 positions/s at 1 row and 260
at 8, and a 150-token prompt pass ran 2.4-4.7x more positions/s at 16 rows than at 1 (calibrating at 1 row, the
estimator predicted the IMDB and CNN/DM grids at about twice their measured time). Methods whose evaluation is the
base model's forward (merged LoRA/IA3, BitFit) take the base model's evaluation rates, measured once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from typing import Any

CACHE_VERSION = 6  # bump when what is measured changes: older cached rates are then measured again
# (2: training and prompt passes measured at the grid's batch sizes instead of one row; 3: evaluation measured
# under the evaluation's own precision context, bf16 frozen weights cast once, as ModelPredictor runs it; 4: prompt
# passes and decode steps also measured at one row, for continuous batching's refills and a batch's last rows;
# 5: evaluation timed inside the generation loop, its own work per decode step measured; 6: that loop's rows end
# one step apart, so one-row refills are timed between full-batch decode steps, as in a real run)


@dataclass
class Rates:
    """A method family's rates on this machine (see the module docstring)."""

    train_positions_per_s: float = 0.0
    head_targets_per_s: float = 0.0      # 0: no frozen-trunk cache for this method
    prefill_positions_per_s: float = 0.0  # a prompt pass of eval_rows rows
    decode_rows_per_s: float = 0.0        # decode steps of eval_rows rows: row-steps per second
    prefill_one_positions_per_s: float = 0.0  # the same at one row (0: not measured, the eval_rows rates serve)
    decode_one_rows_per_s: float = 0.0
    loop_step_seconds: float = 0.0       # the generation loop's own work (slot copies, bookkeeping) per decode step
    eval_rows: int = 0                    # the rows the evaluation rates were measured at (eval.batch_size)
    update_seconds: float = 0.0          # clipping + optimizer step, paid once per optimizer step
    save_seconds: float = 0.0
    load_seconds: float = 0.0
    virtual_positions: int = 0
    cache_bytes_per_target: int = 0      # > 0: the trunk can be cached (frozen, no dropout)
    eval_as_base: bool = False           # evaluation runs the base model's forward (rates taken from the base)
    calibration_seconds: float = 0.0


@dataclass(frozen=True)
class Family:
    """What a calibration measures: one method (or the bare base model) at the grid's shapes."""

    cfg: Any              # a representative RunConfig (model, precision, method, train/eval batch sizes)
    train: bool           # measure training too (False: the base model, evaluation only)
    train_length: int     # mean padded training sequence length (positions)
    target_length: int    # mean target tokens per training sequence
    prompt_length: int    # mean padded evaluation prompt length

    def key(self) -> str:
        from peftlab.lab.results import machine_info

        cfg = self.cfg
        import torch

        machine = machine_info(torch.device("cpu"))
        parts = {"v": CACHE_VERSION, "cpu": machine["cpu"], "threads": machine["torch_threads"],
                 "device": cfg.train.device, "torch": torch.__version__, "model": dataclasses.asdict(cfg.model),
                 "bf16": cfg.train.bf16, "method": _method_of(self), "eval_batch": cfg.eval.batch_size,
                 "prompt": self.prompt_length}
        if self.train:
            parts.update(train={k: getattr(cfg.train, k) for k in ("batch_size", "gradient_checkpointing",
                                                                   "release_freed_memory", "cache_frozen_trunk")},
                         shape=[self.train_length, self.target_length])
        return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _method_of(family: Family) -> dict[str, Any]:
    if not family.train:
        return {"name": "base"}
    return {"name": family.cfg.method.name, "options": family.cfg.method.options}


def _synthetic(tokenizer: Any, length: int, targets: int, seed: int) -> Any:
    """A training sequence of random ordinary tokens with the loss on its last ``targets`` positions."""
    import torch

    from peftlab.data.encode import IGNORE_INDEX, EncodedExample

    low = max(tokenizer.all_special_ids or [0]) + 1
    high = max(low + 1, min(len(tokenizer), 32000))
    ids = torch.randint(low, high, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    targets = max(1, min(targets, length - 1))
    return EncodedExample(ids, [IGNORE_INDEX] * (length - targets) + ids[length - targets:])


def _measure_training(setup: Any, family: Family, rates: Rates) -> None:
    """Time the method's own training step (the Trainer, with the run's precision and trunk-cache settings) on
    synthetic micro-batches of ``train.batch_size`` rows of the grid's mean length: a warm-up step (it pays the
    first call's one-off costs at this shape), 2 timed steps, then, for a method whose trunk is frozen, a second epoch
    of 3 (served by the trunk cache when it is on; its last 2 timed)."""
    from peftlab.methods import get_method
    from peftlab.training.trainer import Trainer

    cfg, tokenizer = family.cfg, setup.tokenizer
    rows, epoch_steps = max(1, cfg.train.batch_size), 3
    steps = 6 if setup.method.frozen_trunk() else 3
    # every sequence of the same length and target count: whatever order the trainer takes them in, each step is
    # the same work
    data = [_synthetic(tokenizer, family.train_length, family.target_length, k) for k in range(rows * epoch_steps)]
    train_cfg = dataclasses.replace(cfg.train, max_steps=steps, batch_size=rows, grad_accum=1, eval_every=0,
                                    save_every=0, log_every=10**9, length_bucketing=False, patience=0,
                                    warmup_steps=0, warmup_ratio=0.0)
    lr = cfg.train.lr or get_method(cfg.method.name).default_lr
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="peftlab-estimate-") as tmp:
        trainer = Trainer(setup.method, data, [], train_cfg, tmp, tokenizer.pad_token_id, lr, None, setup.device,
                          lambda state: times.append(state.train_seconds), setup.autocast)
        t0 = time.perf_counter()
        state = trainer.fit()
        rates.save_seconds = max(0.0, time.perf_counter() - t0 - state.train_seconds)
        cached = trainer.trunk_cache is not None
        rates.update_seconds = _update_seconds(trainer)
    per_step = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    positions = 2 * rows * (family.train_length + rates.virtual_positions)
    compute = sum(per_step[1:epoch_steps]) - 2 * rates.update_seconds
    rates.train_positions_per_s = positions / max(compute, 0.1 * sum(per_step[1:epoch_steps]), 1e-9)
    if cached:  # the second epoch's first step warms the head-only shapes up; its last 2 are timed
        compute = sum(per_step[epoch_steps + 1:]) - 2 * rates.update_seconds
        rates.head_targets_per_s = 2 * rows * family.target_length / max(
            compute, 0.1 * sum(per_step[epoch_steps + 1:]), 1e-9)


def _update_seconds(trainer: Any) -> float:
    """One optimizer update of the trainer's parameters (clipping + AdamW step), which every optimizer step pays
    whatever its batch: timed on zero gradients (the cost does not depend on their values)."""
    import torch

    params = list(trainer.params.values())
    saved = [p.detach().clone() for p in params]
    times = []
    for _ in range(2):
        for p in params:
            p.grad = torch.zeros_like(p)
        t0 = time.perf_counter()
        if trainer.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, trainer.cfg.max_grad_norm)
        trainer.optimizer.step()
        times.append(time.perf_counter() - t0)
    trainer.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p, value in zip(params, saved, strict=True):
            p.copy_(value)
    return min(times)


def _virtual_positions(method: Any, device: Any) -> int:
    """Positions a method adds in front of every sequence (prompt tuning's soft prompt), via its prepare_inputs."""
    import torch

    ids = torch.ones(1, 4, dtype=torch.long, device=device)
    inputs = method.prepare_inputs(ids, torch.ones_like(ids))
    fed = inputs["input_ids"] if "input_ids" in inputs else inputs["inputs_embeds"]
    return max(0, fed.shape[1] - 4)


def loop_plan(rows: int, tail: int = 6) -> list[int]:
    """The output lengths the calibration's generation loop runs at ``rows`` rows: the first batch's rows end one
    step apart (from 2 tokens on), so a freed row is refilled with a one-row prompt pass at almost every step while
    the others decode, as in a real run; ``rows // 2`` newcomers (at least one) run longer, the last ``tail`` steps
    more, so the batch shrinks once the queue is empty and ends with one-row decode steps."""
    newcomers = max(1, rows // 2)
    return [2 + i for i in range(rows)] + [2 + rows] * (newcomers - 1) + [2 + rows + tail]


def _measure_evaluation(setup: Any, family: Family, rates: Rates) -> None:
    """Time evaluation inside its own generation loop
    (:func:`~peftlab.evaluation.generate.continuous_greedy_generate`, every pass timed by
    :class:`~peftlab.evaluation.schedule.PassTimer`), after a short warm-up loop: ``eval.batch_size`` rows over
    synthetic prompts of the grid's mean prompt length whose outputs end at the lengths of
    :func:`loop_plan`. The first prompt pass gives the full batch's prompt rate, the one-row refills the one-row
    rate, the decode steps of every row and of one row the decode rates, and what the loop spent outside its passes
    (slot copies, bookkeeping) its own work per decode step.

    Timed inside a running loop, not pass by pass alone: on a 2-core Xeon (bf16, one thread) a one-row CNN/DM prompt
    pass alone ran 960-1,200 positions/s where the same pass inside a real run's generation ran 553-626, between
    decode steps of 16 rows (BENCHMARKS.md, "Generation, replayed")."""
    import torch

    rows = max(1, family.cfg.eval.batch_size)
    pad = setup.tokenizer.pad_token_id if setup.tokenizer.pad_token_id is not None else setup.tokenizer.eos_token_id
    ends = loop_plan(rows)
    prompts = [_synthetic(setup.tokenizer, family.prompt_length, 1, 7 + k).input_ids for k in range(len(ends))]
    setup.method.model.eval()
    predictor = setup.predictor()
    with torch.no_grad(), predictor.precision():  # the evaluation's own precision (frozen weights cast once)
        _timed_loop(setup, predictor, [p[:16] for p in prompts[:rows + 1]], pad, rows, [2] * rows + [4])  # warm-up
        timer, total = _timed_loop(setup, predictor, prompts, pad, rows, ends)
    v = rates.virtual_positions
    rates.eval_rows = rows
    rates.prefill_positions_per_s = _per_second(
        [(p + v * n, s) for n, p, s in timer.prefills if n == rows])
    rates.decode_rows_per_s = _per_second([(n, s) for n, s in timer.decodes[1:] if n == rows])
    if rows > 1:
        rates.prefill_one_positions_per_s = _per_second([(p + v, s) for n, p, s in timer.prefills if n == 1])
        rates.decode_one_rows_per_s = _per_second([(n, s) for n, s in timer.decodes if n == 1])
    passes = sum(s for *_, s in timer.prefills) + sum(s for _, s in timer.decodes)
    rates.loop_step_seconds = max(0.0, total - passes) / max(1, len(timer.decodes))


def _per_second(work: list[tuple[int, float]]) -> float:
    """Units of work per second over (units, seconds) pairs; 0 (not measured) when there are none."""
    seconds = sum(s for _, s in work)
    return sum(n for n, _ in work) / seconds if work and seconds > 0 else 0.0


def _timed_loop(setup: Any, predictor: Any, prompts: list[list[int]], pad: int, rows: int,
                ends: list[int]) -> tuple[Any, float]:
    """The evaluation's generation loop (with ``predictor``'s settings) over ``prompts`` at ``rows`` rows, prompt
    ``i`` ending after ``ends[i]`` tokens (eos ignored); returns its :class:`~peftlab.evaluation.schedule.PassTimer`
    and its wall seconds.

    A model whose cache the loop cannot turn into slots decodes one batch after another, every row to the longest
    of ``ends`` (one-row passes are then timed only where the last batch has one row)."""
    from peftlab.evaluation.generate import NoSlotCacheError, continuous_greedy_generate
    from peftlab.evaluation.schedule import PassTimer

    def run(lengths: list[int] | None) -> tuple[Any, float]:
        with PassTimer() as timer:
            t0 = time.perf_counter()
            continuous_greedy_generate(setup.method, prompts, pad, set(), max(ends) + 1, setup.device, rows,
                                       compile_step=predictor.compile_decode, refill_rows=predictor.refill_rows,
                                       ends=lengths)
            return timer, time.perf_counter() - t0

    try:
        return run(ends)
    except NoSlotCacheError:
        return run(None)


def measure_family(family: Family) -> Rates:
    """Load the model, apply the family's method and measure its rates (see the module docstring)."""
    import torch

    from peftlab.lab.experiment import _zero_shot_setup, build

    t0 = time.perf_counter()
    cfg = family.cfg
    threads = torch.get_num_threads()
    # the bare base model as a zero-shot run evaluates it (its dtype kept, nothing trains), or the applied method
    setup = build(cfg) if family.train else _zero_shot_setup(cfg)
    rates = Rates(load_seconds=time.perf_counter() - t0)
    rates.virtual_positions = _virtual_positions(setup.method, setup.device)
    if family.train:
        _measure_training(setup, family, rates)
        setup.method.after_training()
    from peftlab.lab.results import count_parameters

    # Evaluation runs the base model's forward when the method merges (as evaluate_splits does) or adds no
    # parameter (BitFit, last-blocks); anything else (a soft prompt, adapters, an untied head) is measured itself.
    merged = setup.method.mergeable and cfg.model.dtype == "float32"
    added = count_parameters(setup.method.model) != setup.total_params
    rates.eval_as_base = family.train and (merged or not added)
    if family.train and setup.method.frozen_trunk():
        from peftlab.training.trunk_cache import estimated_bytes, trunk_dropout

        if not trunk_dropout(setup.method.model) or cfg.train.cache_frozen_trunk in ("on", True):
            rates.cache_bytes_per_target = estimated_bytes(setup.method.model, 1)
    if not rates.eval_as_base:
        if merged:
            setup.method.merge()
        _measure_evaluation(setup, family, rates)
    torch.set_num_threads(threads)
    rates.calibration_seconds = time.perf_counter() - t0
    return rates
