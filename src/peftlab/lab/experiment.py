"""One run, end to end: ``train_run`` (load, apply the method, train, save the adapter, evaluate, write the result)
and ``eval_run`` (the base model zero-shot, or a saved adapter, evaluated on the configured splits).

Nothing already written is overwritten: a run folder that holds a result or a checkpoint is refused unless
``resume=true`` (which continues the interrupted run it holds). A run holds its folder's lock
(:mod:`peftlab.training.run_lock`) from start to end, so a second process pointed at the same ``out`` is refused at
once; every file is written durably (:mod:`peftlab.durable`), ``result.json`` last, so a folder with a
``result.json`` is a finished run.

``train_run`` also runs under ``torchrun`` / ``accelerate launch`` (see :mod:`peftlab.training.distributed`): every
rank trains its share of each batch; rank 0 alone writes files and evaluates, the other ranks return None.
``eval_run`` under a launcher runs on rank 0 only.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftlab.config import ConfigError, RunConfig, TaskConfig, config_from_dict
from peftlab.data.dataset import load_examples
from peftlab.data.encode import PromptEncoder
from peftlab.durable import atomic_write_json
from peftlab.evaluation.forgetting import encode_texts, forgetting_texts, text_cross_entropy
from peftlab.evaluation.generate import ModelPredictor
from peftlab.interop.adapter_files import load_adapter, read_adapter_config
from peftlab.lab import results
from peftlab.lab.result_record import (
    RESULT_NAME,
    EvalSpeed,
    Forgetting,
    MethodFacts,
    ResultRecord,
    RunInfo,
    Sample,
    SplitMetrics,
    SplitRecords,
    TrainInfo,
    ValPoint,
    write_result,
)
from peftlab.methods import get_method
from peftlab.methods.base import PeftMethod
from peftlab.methods.io import save_adapter
from peftlab.models.arch import arch_fingerprint, output_head, transformer_blocks
from peftlab.models.loading import load_model_and_tokenizer
from peftlab.tasks import Example, Task, get_task
from peftlab.tasks.base import pack_records
from peftlab.training.checkpoint import latest_checkpoint
from peftlab.training.distributed import DistContext, init_distributed, is_main
from peftlab.training.run_lock import folder_lock
from peftlab.training.trainer import Trainer, TrainState


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} asked for, but no CUDA device is available")
    return device


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Setup:
    """Everything a run holds after loading: the task, the model with its method, and the prompt encoder."""

    cfg: RunConfig
    task: Task
    tokenizer: Any
    method: PeftMethod
    encoder: PromptEncoder
    fingerprint: dict[str, Any]
    device: torch.device
    total_params: int

    @property
    def autocast(self) -> bool:
        return self.cfg.train.bf16 or self.cfg.model.dtype != "float32"

    def predictor(self) -> ModelPredictor:
        return ModelPredictor(self.method, self.tokenizer, self.encoder, self.cfg.eval.batch_size,
                              self.cfg.eval.num_beams, self.device, self.autocast,
                              self.cfg.eval.continuous_batching, self.cfg.eval.compile, self.cfg.eval.refill_rows)


def _fill_tokenizer_options(options: dict[str, Any], tokenizer) -> dict[str, Any]:
    """Options a method needs token ids for (e.g. a soft prompt initialised from text) are filled here, by field."""
    if options.get("init_text") and options.get("init_token_ids") is None:
        return {**options, "init_token_ids": tokenizer(options["init_text"], add_special_tokens=False).input_ids}
    return options


def build(cfg: RunConfig, adapter: str | Path | None = None, device: torch.device | None = None) -> Setup:
    """Load the model and tokenizer, then apply the configured method (or load ``adapter``).

    ``device`` overrides ``cfg.train.device`` (a rank of a multi-process run passes its own).
    """
    device = device or resolve_device(cfg.train.device)
    set_seed(cfg.train.seed)
    model, tokenizer = load_model_and_tokenizer(cfg.model, device)
    fingerprint = arch_fingerprint(model)
    total = results.count_parameters(model)
    if adapter is not None:
        method, _ = load_adapter(model, adapter)
    else:
        spec = get_method(cfg.method.name)
        options = _fill_tokenizer_options(cfg.method.options, tokenizer)
        method = spec.apply(model, spec.build_config(options))
    # Trainable weights stay fp32 (master weights) when the frozen base is stored in bf16/fp16.
    for p in method.trainable_parameters().values():
        if p.dtype != torch.float32:
            p.data = p.data.float()
    method.model.to(device)
    task = get_task(cfg.task)
    return Setup(cfg, task, tokenizer, method, PromptEncoder(tokenizer, task, cfg.task), fingerprint, device, total)


def forgetting_ce(setup: Setup, adapted: bool) -> dict[str, Any] | None:
    """Cross-entropy on the configured out-of-task sample (``eval.forgetting_*``; None when it is off).

    ``adapted=False`` feeds the text without the method's virtual tokens: right after the method is applied that is
    the base model (see :mod:`peftlab.evaluation.forgetting`); ``adapted=True`` scores the model as it is used.
    """
    ev = setup.cfg.eval
    if ev.forgetting_data is None:
        return None
    texts = forgetting_texts(ev.forgetting_data, ev.forgetting_split, ev.forgetting_field, ev.forgetting_examples)
    ids = encode_texts(setup.tokenizer, texts, ev.forgetting_tokens)
    pad = setup.tokenizer.pad_token_id if setup.tokenizer.pad_token_id is not None else setup.tokenizer.eos_token_id
    ce, tokens = text_cross_entropy(setup.method.model, ids, pad, setup.method.prepare_inputs if adapted else None,
                                    setup.device, setup.autocast)
    return {"data": ev.forgetting_data, "split": ev.forgetting_split, "field": ev.forgetting_field,
            "texts": len(ids), "tokens": tokens, "ce": ce}


def _forgetting_record(before: dict[str, Any] | None, after: dict[str, Any] | None) -> Forgetting | None:
    """The result's record of two :func:`forgetting_ce` measurements (``before_ce`` None if unknown)."""
    if after is None:
        return None
    before_ce = before["ce"] if before is not None else None
    return Forgetting(data=after["data"], split=after["split"], field=after["field"], texts=after["texts"],
                      tokens=after["tokens"], before_ce=before_ce, after_ce=after["ce"],
                      delta_ce=after["ce"] - before_ce if before_ce is not None else None)


def _check_out_dir(out: Path, resume: bool) -> None:
    if resume:
        return
    if (out / RESULT_NAME).exists() or latest_checkpoint(out) is not None:
        raise ConfigError(f"out: {out} already holds a run; pass resume=true to continue it, or choose another out")


def load_split(setup: Setup, which: str, limit: int | None, sample_seed: int | None = None) -> list[Example]:
    """The examples of split ``which`` ("train", "validation", "test" or a split's own name) as a run reads them:
    the first ``limit``, or ``limit`` sampled with ``sample_seed``; examples skipped for an empty target are named on
    stderr (rank 0)."""
    data = setup.cfg.data
    split = {"train": data.train_split, "validation": data.validation_split, "test": data.test_split}.get(which, which)
    examples, stats = load_examples(data, setup.task, split, limit=limit, sample_seed=sample_seed)
    if stats.get("skipped_empty_target") and is_main():
        print(f"[data] {split}: skipped {stats['skipped_empty_target']} example(s) with an empty target "
              f"(data.strict=true makes this an error)", file=sys.stderr)
    return examples


@dataclass
class Evaluation:
    """What :func:`evaluate_splits` measured, by split: the parts of the result record it fills."""

    metrics: dict[str, SplitMetrics] = dataclasses.field(default_factory=dict)
    samples: dict[str, list[Sample]] = dataclasses.field(default_factory=dict)
    speed: dict[str, EvalSpeed] = dataclasses.field(default_factory=dict)
    per_example: dict[str, SplitRecords] = dataclasses.field(default_factory=dict)


def evaluate_splits(setup: Setup, splits: list[str], merge: bool = True) -> Evaluation:
    """Task metrics, a few samples, throughput and per-example records (for paired significance tests: example ids
    plus the task's records, baselines' under ``"baselines"``) for each split (LoRA-style methods merged while
    evaluating)."""
    done = Evaluation()
    cfg = setup.cfg
    # Merging into a bf16/fp16 base would round small updates away; merge only into fp32 weights.
    merged = merge and setup.method.mergeable and cfg.model.dtype == "float32"
    if merged:
        setup.method.merge()
    try:
        for split in splits:
            limit = cfg.data.max_test if split in ("test", cfg.data.test_split) else cfg.data.max_validation
            examples = load_split(setup, split, limit)
            t0 = time.perf_counter()
            output = setup.task.evaluate(setup.predictor(), examples, cfg.eval.max_new_tokens)
            seconds = time.perf_counter() - t0
            done.metrics[split] = SplitMetrics(scores=dict(output.metrics), n_examples=len(examples),
                                               baselines=output.baselines or None)
            done.per_example[split] = SplitRecords(
                ids=[e.id for e in examples], records=pack_records(output.per_example),
                baselines={name: pack_records(records) for name, records in output.baseline_per_example.items()}
                if output.baseline_per_example else None)
            done.speed[split] = EvalSpeed(eval_seconds=seconds, eval_examples_per_s=len(examples) / max(seconds, 1e-9))
            shown = list(zip(examples, output.predictions, strict=True))[: cfg.eval.show_examples]
            done.samples[split] = [Sample(id=e.id, source=e.source[:600], prediction=p, references=e.references[:4])
                                   for e, p in shown]
    finally:
        if merged:
            setup.method.unmerge()
    return done


@dataclass(frozen=True)
class RunStart:
    """When a run started, by the wall clock and by this process's CPU clock, and the code it runs (the commit at
    the start). The CPU seconds a run used, against its wall seconds, show how much of the machine it had: a run
    pinned to one core with one thread that got all of it has cpu_seconds close to its wall time."""

    wall: float = dataclasses.field(default_factory=time.time)
    cpu: float = dataclasses.field(default_factory=time.process_time)
    commit: str | None = dataclasses.field(default_factory=results.git_commit)


def _run_info(cfg: RunConfig, setup: Setup, command: str, start: RunStart,
              earlier_seconds: float | None = None) -> RunInfo:
    return RunInfo(command=command, config=cfg.to_dict(), versions=results.package_versions(),
                   machine=results.machine_info(setup.device), seed=cfg.train.seed, git_commit=start.commit,
                   started=start.wall, finished=time.time(), cpu_seconds=time.process_time() - start.cpu,
                   earlier_seconds=earlier_seconds or None)


def _param_info(setup: Setup) -> dict[str, Any]:
    """``trainable_params``, ``total_params`` and ``trainable_percent`` (fields of :class:`TrainInfo`)."""
    trainable = sum(p.numel() for p in setup.method.trainable_parameters().values())
    return {"trainable_params": trainable, "total_params": setup.total_params,
            "trainable_percent": 100.0 * trainable / max(setup.total_params, 1)}


def train_run(cfg: RunConfig, command: str = "",
              on_step: Callable[[TrainState], None] | None = None) -> ResultRecord | None:
    """Train ``cfg.method`` on ``cfg.task``/``cfg.data``, save the adapter, evaluate, and write ``result.json``.

    Under ``torchrun``/``accelerate launch`` every rank trains its share of each (global) batch; rank 0 then saves,
    evaluates and returns the result, while the other ranks return None as soon as training is done.
    """
    start = RunStart()
    ctx = init_distributed(cfg.train.device)
    with folder_lock(cfg.out, "out", enabled=ctx.is_main):
        return _train_locked(cfg, ctx, command, on_step, start)


def _train_locked(cfg: RunConfig, ctx: DistContext, command: str, on_step: Callable[[TrainState], None] | None,
                  start: RunStart) -> ResultRecord | None:
    """:func:`train_run` while holding the run folder's lock (rank 0)."""
    out = Path(cfg.out)
    _check_out_dir(out, cfg.resume)
    results.reset_peak_memory(ctx.device)  # this run's peak, not an earlier run's in the same process (compare)
    start_memory = results.resident_memory(ctx.device)
    setup = build(cfg, device=ctx.device)
    # The base model's cross-entropy on out-of-task text, before any step (and before a resume loads weights).
    forgetting_before = forgetting_ce(setup, adapted=False) if ctx.is_main else None
    train = load_split(setup, "train", cfg.data.max_train, sample_seed=cfg.data.seed)
    setup.task.fit_labels(train)
    val = load_split(setup, "validation", cfg.data.max_validation)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", cfg.to_dict())
    metric_val = val[: cfg.train.eval_examples]

    def validation_metrics() -> dict[str, float]:
        return setup.task.evaluate(setup.predictor(), metric_val, cfg.eval.max_new_tokens).metrics

    lr = cfg.train.lr or get_method(cfg.method.name).default_lr
    trainer = Trainer(setup.method, setup.encoder.encode_many(train), setup.encoder.encode_many(val), cfg.train,
                      out, setup.tokenizer.pad_token_id, lr, validation_metrics if metric_val else None,
                      setup.device, on_step, setup.autocast, dist=ctx, started=start.wall)
    if cfg.resume and trainer.resume() and ctx.is_main:
        print(f"[train] resumed from step {trainer.state.step} of {trainer.total_steps}", file=sys.stderr)
    state = trainer.fit()
    train_peak = results.peak_memory(ctx.device)["peak_memory_bytes"]
    earlier = trainer.earlier_wall_seconds  # resumed: what the earlier attempts took up to the checkpoint
    epochs = state.epoch + state.batch_in_epoch / max(trainer.batches_per_epoch, 1)
    if trainer.sharded:  # FSDP shards: gather whole weights (all ranks), then rank 0 continues on a plain model
        weights = trainer.full_weights()
        del trainer
        if ctx.is_main:
            setup = _unsharded(setup, cfg, weights, ctx)
    if not ctx.is_main:
        return None
    info = {"lr": lr, "steps": state.step, "epochs_completed": epochs, "train_examples": len(train),
            "world_size": ctx.world_size, "skipped_nonfinite_steps": state.skipped_steps,
            "forgetting_before": forgetting_before, "start_memory_bytes": start_memory,
            "train_peak_memory_bytes": train_peak, "earlier_seconds": earlier}
    return _finish_train(cfg, setup, state, info, out, command, start)


def _unsharded(setup: Setup, cfg: RunConfig, weights: dict[str, torch.Tensor], ctx: DistContext) -> Setup:
    """``setup`` with a fresh, unsharded copy of the model carrying the trained ``weights`` (rank 0 after FSDP)."""
    fresh = build(cfg, device=ctx.device).method
    fresh.load_adapter_state_dict(weights)
    return dataclasses.replace(setup, method=fresh)


def _finish_train(cfg: RunConfig, setup: Setup, state: TrainState, info: dict[str, Any], out: Path, command: str,
                  start: RunStart) -> ResultRecord:
    """Save the adapter, evaluate, and write ``result.json`` (rank 0 / the single process)."""
    params = _param_info(setup)  # counted as trained, before after_training() may fold parameters away
    head_weight = output_head(setup.method.model).weight
    head_trains = any(p is head_weight for p in setup.method.trainable_parameters().values())
    frozen_trunk = setup.method.frozen_trunk()
    blocks = transformer_blocks(setup.method.model)
    # The bottom blocks nothing trains in: a forward pass per token that ran them, no backward.
    frozen_body = sum(p.numel() for block in blocks[:setup.method.frozen_blocks()] for p in block.parameters())
    setup.method.after_training()
    forgetting = _forgetting_record(info.pop("forgetting_before"), forgetting_ce(setup, adapted=True))
    earlier = info.pop("earlier_seconds")
    adapter_dir = save_adapter(setup.method, cfg.method.name, out / "adapter", cfg.model.name, setup.fingerprint,
                               extra={"task": _task_record(cfg.task, setup.task)})
    evaluation = evaluate_splits(setup, cfg.eval.splits)
    head = head_weight.numel()
    # The body: every weight of the transformer blocks (what each trunk token multiplies), not embedding or head.
    body = sum(p.numel() for block in blocks for p in block.parameters())
    train_info = TrainInfo(
        method=MethodFacts(name=cfg.method.name, facts=setup.method.describe()),
        **params,
        **info,  # lr, steps, epochs_completed, train_examples, world_size (known before the trainer is gone)
        train_seconds=state.train_seconds,
        epoch_seconds=state.epoch_seconds,
        trunk_cache=state.trunk_cache,  # train.cache_frozen_trunk in effect: later epochs skipped the trunk
        trunk_cache_bytes=state.trunk_cache_bytes,
        train_input_tokens=state.input_tokens,
        train_target_tokens=state.target_tokens,
        train_tokens_per_s=state.input_tokens / max(state.train_seconds, 1e-9),
        eval=evaluation.speed,
        **results.peak_memory(setup.device),
        train_trunk_tokens=state.trunk_input_tokens,
        train_flops_estimate=results.estimate_training_flops(
            body, head, params["trainable_params"], state.trunk_input_tokens,
            state.target_tokens, frozen_trunk=frozen_trunk, head_trains=head_trains, frozen_body_params=frozen_body,
            input_tokens=state.input_tokens),
        adapter_bytes=(adapter_dir / "adapter.safetensors").stat().st_size,
        loss_curve=state.loss_curve,
        val_curve=[ValPoint.from_dict(point, "val_curve") for point in state.val_curve],
        best_step=state.best_step,
        early_stop_step=state.step if state.stopped_early else None,
        forgetting=forgetting,
    )
    result = ResultRecord(kind="train", run_info=_run_info(cfg, setup, command, start, earlier),
                          train_info=train_info, metrics=evaluation.metrics, samples=evaluation.samples,
                          per_example=evaluation.per_example)
    write_result(out / RESULT_NAME, result)
    return result


def _task_record(task_cfg: TaskConfig, task: Task) -> dict[str, Any]:
    """The task settings an adapter was trained with (the prompt format belongs to the adapter)."""
    record = dataclasses.asdict(task_cfg)
    if getattr(task, "labels", None):
        record["labels"] = list(task.labels)
    record["template"] = task_cfg.template
    return record


def eval_run(cfg: RunConfig, command: str = "") -> ResultRecord | None:
    """Evaluate the base model zero-shot (``adapter`` unset) or with a saved adapter; writes ``result.json``.

    Under a multi-process launcher only rank 0 evaluates; the other ranks return None at once.
    """
    if not is_main():
        return None
    with folder_lock(cfg.out, "out"):
        return _eval_locked(cfg, command)


def _eval_locked(cfg: RunConfig, command: str) -> ResultRecord:
    """:func:`eval_run` while holding the output folder's lock."""
    start = RunStart()
    out = Path(cfg.out)
    _check_out_dir(out, resume=False)
    device = resolve_device(cfg.train.device)
    results.reset_peak_memory(device)
    start_memory = results.resident_memory(device)
    if cfg.adapter is not None:
        adapter_cfg = read_adapter_config(cfg.adapter)
        # The prompt format is part of the adapter: evaluate with the task settings it was trained with.
        cfg = config_from_dict({**cfg.to_dict(), "task": adapter_cfg.get("task", dataclasses.asdict(cfg.task)),
                                "method": {"name": adapter_cfg["method"], "options": adapter_cfg["method_config"]}})
        setup = build(cfg, adapter=cfg.adapter)
    else:
        setup = _zero_shot_setup(cfg)
    if setup.task.needs_train_labels and not cfg.task.labels:
        setup.task.fit_labels(load_split(setup, "train", None))
    evaluation = evaluate_splits(setup, cfg.eval.splits)
    method_name = read_adapter_config(cfg.adapter)["method"] if cfg.adapter else "zero-shot"
    after = forgetting_ce(setup, adapted=True)
    # Zero-shot: the model is the base model, so before = after; an adapter's base is not measured here.
    before = after if not cfg.adapter else None
    train_info = TrainInfo(method=MethodFacts(name=method_name, facts=setup.method.describe()), **_param_info(setup),
                           eval=evaluation.speed, **results.peak_memory(setup.device),
                           start_memory_bytes=start_memory, forgetting=_forgetting_record(before, after))
    if not cfg.adapter:
        train_info.trainable_params = 0
        train_info.trainable_percent = 0.0
    result = ResultRecord(kind="eval", run_info=_run_info(cfg, setup, command, start),
                          train_info=train_info, metrics=evaluation.metrics, samples=evaluation.samples,
                          per_example=evaluation.per_example)
    write_result(out / RESULT_NAME, result)
    return result


def _zero_shot_setup(cfg: RunConfig) -> Setup:
    """The base model untouched, in the dtype it was loaded in, behind a no-op method handle (nothing trains)."""
    from peftlab.methods.base import BaseModelHandle

    device = resolve_device(cfg.train.device)
    set_seed(cfg.train.seed)
    model, tokenizer = load_model_and_tokenizer(cfg.model, device)
    task = get_task(cfg.task)
    return Setup(cfg, task, tokenizer, BaseModelHandle(model.to(device)), PromptEncoder(tokenizer, task, cfg.task),
                 arch_fingerprint(model), device, results.count_parameters(model))
