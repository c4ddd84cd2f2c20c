"""One explicit training loop: AdamW over the method's trainable parameters, warmup + schedule, gradient
accumulation normalised by target tokens, clipping, bf16 autocast, validation with early stopping and restore of
the best weights, atomic checkpoints and exact resume.

Resume is exact on CPU: the batch order is a pure function of (seed, epoch), the position in it is checkpointed, and
so are the optimizer, scheduler and torch RNG states, so an interrupted run continued with ``resume=true`` ends with
the same weights as an uninterrupted one.

Under several processes (``torchrun``, ``accelerate launch``; see :mod:`peftlab.training.distributed`) each optimizer
step's micro-batches are split across ranks, the loss is normalised by the step's global target-token count and
gradients are summed, so the run trains what the single-process run trains; rank 0 alone writes files.

Faults stop the run with a one-line error and leave the last checkpoint intact: a NaN/inf loss or gradient is caught
before the optimizer step (``NonFiniteError``, naming the step; ``train.skip_nonfinite`` skips that update instead),
an out-of-memory batch names its shape and what to lower (``TrainingOutOfMemoryError``), and a full or read-only
disk names the path (:class:`~peftlab.durable.DiskWriteError`).

``train.compile`` runs each transformer block compiled by ``torch.compile`` during :meth:`Trainer.fit`
(:mod:`peftlab.models.compiled_blocks`); evaluation afterwards runs them eager again.

When only the output head trains (``PeftMethod.frozen_trunk()``), each training example's trunk features are computed
once and reused in later epochs; when only the top blocks train (``PeftMethod.frozen_blocks()``), the hidden states
entering the first trained block are (``train.cache_frozen_trunk``, :mod:`peftlab.training.trunk_cache`).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from peftlab.config import ConfigError, TrainConfig
from peftlab.data.batching import collate, length_bucketed_batches
from peftlab.data.encode import EncodedExample
from peftlab.durable import DiskWriteError, is_disk_error
from peftlab.methods.base import PeftMethod
from peftlab.models.arch import output_head, transformer_blocks
from peftlab.models.checkpointing import checkpoint_blocks
from peftlab.models.compiled_blocks import compiled_blocks, eager
from peftlab.models.loading import frozen_matmul_weights_in_bf16
from peftlab.models.recompute import recompute_elementwise
from peftlab.training import distributed as D
from peftlab.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from peftlab.training.host_memory import release_freed_memory
from peftlab.training.loss import IGNORE_INDEX, chunked_cross_entropy, target_only_loss
from peftlab.training.metrics_log import MetricsLog
from peftlab.training.schedule import lr_lambda
from peftlab.training.trunk_cache import announce, trunk_cache_for


@dataclass
class TrainState:
    """Everything about the loop's progress that a checkpoint must carry."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    input_tokens: int = 0
    target_tokens: int = 0
    # Tokens that went through the trunk's frozen part (all of it for a frozen trunk, the blocks below the first
    # trained one for frozen lower blocks): input_tokens, less what the frozen-trunk cache served (for the FLOP count).
    trunk_input_tokens: int = 0
    train_seconds: float = 0.0
    best_val_loss: float | None = None
    best_step: int | None = None
    bad_validations: int = 0
    stopped_early: bool = False
    window_loss: float = 0.0  # summed target-token loss since the last train-loss log record
    window_tokens: int = 0
    loss_curve: list[list[float]] = field(default_factory=list)
    val_curve: list[dict[str, Any]] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    trunk_cache: bool = False  # train.cache_frozen_trunk was in effect (the frozen part ran once per example)
    trunk_cache_bytes: int = 0  # bytes of cached trunk features at the end of fit(), summed over processes
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss/gradient (train.skip_nonfinite)
    # Wall seconds the run had taken when this checkpoint was written, over all its attempts (each from its own
    # ``started``: loading, training, validations); a resumed run adds its own attempt to it.
    wall_seconds: float = 0.0


class Interrupt(Exception):
    """Raised by a step callback to stop training abruptly (used to test resume)."""


class NonFiniteError(ValueError):
    """A step's loss or gradient is NaN/inf; the message names the step and the last good checkpoint."""


class TrainingOutOfMemoryError(ValueError):
    """A training batch did not fit in memory; the message names the batch shape and what to lower."""


OOM_ERRORS = (torch.OutOfMemoryError, MemoryError)
OOM_TEXTS = ("out of memory", "can't allocate memory", "failed to allocate")  # CUDA, CPU allocator, MPS/XPU


def planned_steps(cfg: TrainConfig, n_examples: int) -> int:
    """The optimizer steps a run of ``n_examples`` training examples takes under ``cfg``:
    ``max_steps`` when set, else ``epochs`` passes of ``ceil(n / batch_size)`` micro-batches over ``grad_accum``, but
    at least ``min_steps`` (patience may stop it earlier)."""
    per_epoch = math.ceil(n_examples / cfg.batch_size)
    return cfg.max_steps or max(1, cfg.min_steps or 0, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))


class Trainer:
    """Trains ``method``'s parameters on encoded examples.

    Args:
        method: the applied PEFT method (its ``model`` is trained in place).
        train_data: encoded training examples.
        val_data: encoded validation examples for the validation loss (may be empty).
        cfg: training settings.
        out_dir: run folder for checkpoints and ``metrics.jsonl``.
        pad_id: padding token id.
        lr: the learning rate to use (``cfg.lr`` or the method's default).
        metric_fn: called at each validation; returns task metrics on a validation subset (may be None).
        device: where batches go.
        on_step: optional callback after each optimizer step (tests use it to interrupt a run).
        autocast_bf16: bfloat16 autocast for forward/backward (also on when ``cfg.bf16``). The frozen matmul weights
            are then cast to bf16 once for the whole of :meth:`fit` instead of at every forward
            (:func:`~peftlab.models.loading.frozen_matmul_weights_in_bf16`: bitwise the same steps, 2 bytes more
            per frozen parameter).
        dist: this process's place in a multi-process run (None: a single process). With several processes,
            ``cfg.batch_size`` stays the GLOBAL micro-batch (each rank takes its share of its rows), trainable
            parameters are broadcast from rank 0, and fully trained transformer blocks are sharded with FSDP.
        started: when this attempt at the run started (Unix time; default: now), for ``TrainState.wall_seconds``.
    """

    def __init__(self, method: PeftMethod, train_data: list[EncodedExample], val_data: list[EncodedExample],
                 cfg: TrainConfig, out_dir: str | Path, pad_id: int, lr: float,
                 metric_fn: Callable[[], dict[str, float]] | None = None, device: torch.device | str = "cpu",
                 on_step: Callable[[TrainState], None] | None = None, autocast_bf16: bool = False,
                 dist: D.DistContext | None = None, started: float | None = None) -> None:
        if not train_data:
            raise ValueError("no training examples (check data.path, data.train_split and data.max_train)")
        self.method, self.model = method, method.model
        self.train_data, self.val_data, self.cfg = train_data, val_data, cfg
        self.out_dir, self.pad_id, self.lr, self.device = Path(out_dir), pad_id, lr, torch.device(device)
        self.metric_fn, self.on_step = metric_fn, on_step
        self.started = time.time() if started is None else started
        self.earlier_wall_seconds = 0.0  # what earlier attempts had taken up to the checkpoint this one resumed
        self.autocast = autocast_bf16 or cfg.bf16
        self.dist = dist or D.DistContext(device=self.device)
        if self.dist.enabled and cfg.batch_size < self.dist.world_size and self.dist.is_main:
            warnings.warn(f"train.batch_size={cfg.batch_size} is the global micro-batch, smaller than the "
                          f"{self.dist.world_size} processes: some ranks only run zero-weight dummies", stacklevel=2)
        if not method.trainable_parameters():
            raise ValueError("the method has no trainable parameters")
        if cfg.release_freed_memory and self.device.type == "cpu":
            release_freed_memory()
        if cfg.recompute_elementwise:
            recompute_elementwise(self.model)
        if cfg.gradient_checkpointing:  # before sharding: FSDP's hooks then stay outside the checkpointed forward
            checkpoint_blocks(self.model)
        # Identical starting weights on every rank, then shard what trains entirely; the optimizer must see the
        # sharded parameters, so it is built after.
        self.dist.broadcast_parameters(list(method.trainable_parameters().values()))
        self.sharded_blocks = (D.shard_trained_blocks(transformer_blocks(self.model), self.dist)
                               if self.dist.enabled else [])
        self.params = method.trainable_parameters()
        # Per method group (one for most; LoRA+: A at lr, B at ratio * lr) a decay and a no-decay AdamW group, each
        # at its own base lr, which the LambdaLR schedule below scales by the same factor.
        groups = method.param_groups()
        if sorted(k for g in groups for k in g.params) != sorted(self.params):
            raise ValueError("the method's param_groups() do not partition its trainable_parameters()")
        adamw_groups = []
        for g in groups:
            decay = [p for p in g.params.values() if p.ndim >= 2]
            no_decay = [p for p in g.params.values() if p.ndim < 2]  # biases, norms, IA3-style scale vectors
            adamw_groups += [{"params": decay, "weight_decay": cfg.weight_decay, "lr": lr * g.lr_scale},
                             {"params": no_decay, "weight_decay": 0.0, "lr": lr * g.lr_scale}]
        self.optimizer = torch.optim.AdamW(adamw_groups, lr=lr)
        self.lengths = [len(e.input_ids) for e in train_data]
        # Position t predicts token t+1: the labelled positions of labels[1:] are the tokens the loss counts.
        self.target_counts = [sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in train_data]
        self.batches_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
        # Frozen-trunk caching: not checkpointed; after a resume the cache is rebuilt as examples come round again.
        all_targets = sum(self.target_counts)
        self.trunk_cache = trunk_cache_for(method, cfg.cache_frozen_trunk, sum(self.lengths), all_targets)
        self._trunk_seen: set[int] = set()  # examples whose trunk features the cache holds (global indices)
        if self.trunk_cache is not None and self.dist.is_main:
            announce(self.trunk_cache, len(train_data))
        self.total_steps = planned_steps(cfg, len(train_data))
        warmup = cfg.warmup_steps or int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.schedule, warmup, self.total_steps))
        self.state = TrainState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.log = MetricsLog(self.out_dir / "metrics.jsonl")

    @property
    def sharded(self) -> bool:
        """True when some parameters are FSDP shards (whole weights then need :meth:`full_weights`)."""
        return bool(self.sharded_blocks)

    # ---- batches -------------------------------------------------------------------------------------------
    def _micro_batches(self) -> Iterator[tuple[int, int, list[int]]]:
        """(epoch, index in epoch, example indices) from the current position onwards, across epochs."""
        epoch, start = self.state.epoch, self.state.batch_in_epoch
        while True:
            order = length_bucketed_batches(self.lengths, self.cfg.batch_size, self.cfg.seed, epoch,
                                            self.cfg.length_bucketing)
            for i in range(start, len(order)):
                yield epoch, i, order[i]
            epoch, start = epoch + 1, 0

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    def _local_batch(self, data: list[EncodedExample],
                     indices: list[int]) -> tuple[dict[str, torch.Tensor], float, list[int]]:
        """This rank's rows of one global micro-batch, their weight (1, or 0 for a dummy) and their example indices.

        A rank whose share is empty (a short last batch with fewer rows than ranks) runs the batch's first row with
        weight 0: its gradient contribution is zero, but it still takes part in FSDP's collectives.
        """
        rows = self.dist.shard(indices)
        weight = 1.0 if rows else 0.0
        rows = rows or indices[:1]
        return self._to_device(collate([data[i] for i in rows], self.pad_id)), weight, rows

    def _forward_loss(self, batch: dict[str, torch.Tensor], rows: list[int] | None = None) -> tuple[torch.Tensor, int]:
        """Summed target-token loss and target count; ``rows`` (training-example indices of the batch rows) lets the
        frozen-trunk cache serve the frozen part's features, so only what trains above it runs."""
        inputs = self.method.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if self.trunk_cache is not None and rows is not None:
                hidden, targets = self.trunk_cache.features(self.model, rows, inputs)  # (N, d), (N,)
                return chunked_cross_entropy(output_head(self.model), hidden, targets), int(targets.numel())
            return target_only_loss(self.model, inputs)

    # ---- the loop ------------------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        """Train to ``total_steps`` (or early stop), then restore the best validated weights."""
        if self.state.step == 0 and self.dist.is_main:
            self.log.truncate_to(0)  # records of an earlier attempt that was killed before its first checkpoint
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step", dynamic_ncols=True,
                   mininterval=1.0, disable=not self.dist.is_main)
        self.model.train()
        self.state.trunk_cache = self.trunk_cache is not None
        bf16_weights = frozen_matmul_weights_in_bf16(self.model) if self.autocast else contextlib.nullcontext()
        if self.cfg.compile and self.sharded:
            raise ConfigError("train.compile=true is not supported with FSDP-sharded blocks (several processes "
                              "training whole blocks; not tested together): set train.compile=false")
        compiled = compiled_blocks(self.model, type(self.method).__name__, self.cfg.compile)
        try:
            with bf16_weights, compiled:
                self._loop(bar)
        except OSError as exc:
            if not is_disk_error(exc):
                raise
            raise DiskWriteError(
                f"could not write {exc.filename or self.out_dir}: {exc.strerror or exc}; "
                f"{self._last_good()} (resume=true continues from it once the disk has space and is writable)"
            ) from exc
        finally:
            bar.close()
        if self.trunk_cache is not None:
            self.state.trunk_cache_bytes = int(self.dist.sum_floats([float(self.trunk_cache.nbytes)])[0])
        if self.best_weights is not None:
            self.method.load_adapter_state_dict(self.best_weights)
        self.model.eval()
        return self.state

    def _loop(self, bar: tqdm) -> None:
        """The steps from the current position to ``total_steps`` (or an early stop)."""
        stream = self._micro_batches()
        while self.state.step < self.total_steps and not self.state.stopped_early:
            t0 = time.perf_counter()
            micro = [next(stream) for _ in range(self.cfg.grad_accum)]
            step_loss, step_targets = self._train_step([idx for _, _, idx in micro])
            self._advance(micro, time.perf_counter() - t0)
            self.state.target_tokens += step_targets
            self.state.window_loss += step_loss
            self.state.window_tokens += step_targets
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss / max(step_targets, 1):.3f}",
                            tok_s=f"{self.state.input_tokens / max(self.state.train_seconds, 1e-9):.0f}")
            if self.state.step % self.cfg.log_every == 0 or self.state.step == self.total_steps:
                self._log_train(self.state.window_loss / max(self.state.window_tokens, 1))
                self.state.window_loss, self.state.window_tokens = 0.0, 0
            self._maybe_validate_and_save()
            if self.on_step is not None:
                self.on_step(self.state)

    def _last_good(self) -> str:
        """Where the last good checkpoint is, for error messages (the run stopped before touching it)."""
        folder = latest_checkpoint(self.out_dir)
        if folder is None:
            return f"there is no checkpoint in {self.out_dir} yet"
        return f"the last good checkpoint {folder} is intact"

    def _count_tokens(self, micro: list[list[int]]) -> None:
        """Add this step's input tokens, and those that run the trunk: all of them, or with the frozen-trunk cache
        only those of examples it does not hold yet (each example once; again after a resume, which starts an empty
        cache)."""
        tokens = sum(self.lengths[i] for idx in micro for i in idx)
        self.state.input_tokens += tokens
        if self.trunk_cache is not None:
            new = {i for idx in micro for i in idx} - self._trunk_seen
            self._trunk_seen |= new
            tokens = sum(self.lengths[i] for i in new)
        self.state.trunk_input_tokens += tokens

    def _train_step(self, micro: list[list[int]]) -> tuple[float, int]:
        """One optimizer step over the GLOBAL micro-batches ``micro``; returns (summed loss, target tokens) of the
        whole step, over all ranks.

        Each rank backpropagates ``loss_sum(its rows) / N`` with N the step's global target-token count (every rank
        knows every example of the step, so N needs no communication); summing gradients over ranks then gives the
        single-process gradient ``sum(all token losses) / N`` exactly, up to summation order.
        """
        step_targets = sum(self.target_counts[i] for idx in micro for i in idx)
        self._count_tokens(micro)
        local_loss = 0.0
        for k, indices in enumerate(micro):
            batch, weight, rows = self._local_batch(self.train_data, indices)
            D.set_gradient_sync(self.sharded_blocks, k == len(micro) - 1)  # FSDP reduces once, after the last
            try:
                loss_sum, _ = self._forward_loss(batch, rows)
                (loss_sum / max(step_targets, 1) if weight else loss_sum * 0.0).backward()
            except (*OOM_ERRORS, RuntimeError) as exc:
                self._raise_if_oom(exc, batch["input_ids"].shape)
                raise
            local_loss += weight * float(loss_sum.detach())
        step_loss = self.dist.reduce_step(list(self.params.values()), local_loss)
        if not self._finite(step_loss):
            if not self.cfg.skip_nonfinite:
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteError(
                    f"train: step {self.state.step + 1}: the loss ({step_loss}) or a gradient is NaN/inf; stopped "
                    f"before the optimizer step, so no weight took it, and {self._last_good()} (resume=true "
                    f"continues from it). Lower train.lr, keep train.max_grad_norm set, check this step's data, or "
                    f"set train.skip_nonfinite=true to skip such updates")
            return self._skip_update()
        if self.cfg.max_grad_norm is not None:
            if self.sharded:
                D.clip_grad_norm(list(self.params.values()), self.cfg.max_grad_norm, self.dist)
            else:  # replicated gradients are equal on every rank: the single-process clipping, bit for bit
                torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, step_targets

    def _finite(self, step_loss: float) -> bool:
        """Whether the step's loss and every gradient are finite, agreed by all processes (FSDP shards differ)."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        # Max-abs per tensor (no squares that could overflow a large but finite gradient), one device sync.
        peak = torch.stack(torch._foreach_norm(grads, float("inf"))).max() if grads else torch.tensor(0.0)
        bad = float(not math.isfinite(step_loss) or not bool(torch.isfinite(peak)))
        if self.sharded:
            bad = self.dist.sum_floats([bad])[0]
        return bad == 0

    def _skip_update(self) -> tuple[float, int]:
        """train.skip_nonfinite: drop this step's gradients; the step still counts (the schedule and the batch
        stream stay where an uninterrupted count puts them), but adds no loss or target tokens."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.skipped_steps += 1
        self._append_log({"step": self.state.step + 1, "split": "train", "event": "skipped_nonfinite"})
        return 0.0, 0

    def _raise_if_oom(self, exc: BaseException, shape: torch.Size) -> None:
        """Re-raise an out-of-memory error as :class:`TrainingOutOfMemoryError` saying what to lower."""
        if not isinstance(exc, OOM_ERRORS) and not any(t in str(exc).lower() for t in OOM_TEXTS):
            return
        self.optimizer.zero_grad(set_to_none=True)
        rows, length = shape[0], shape[-1]
        effective = self.cfg.batch_size * self.cfg.grad_accum
        raise TrainingOutOfMemoryError(
            f"train: out of memory at step {self.state.step + 1} on a micro-batch of {rows} sequence(s) of "
            f"{length} tokens (train.batch_size={self.cfg.batch_size}, train.grad_accum={self.cfg.grad_accum}) on "
            f"{self.device}: lower train.batch_size (and raise train.grad_accum to keep the effective batch of "
            f"{effective}), lower task.max_source_tokens / task.max_target_tokens, or set "
            f"train.gradient_checkpointing=true; {self._last_good()}") from exc

    def _advance(self, micro: list[tuple[int, int, list[int]]], seconds: float) -> None:
        """Count the step and move the stream position past its micro-batches."""
        self.state.step += 1
        self.state.train_seconds += seconds
        if any(index + 1 == self.batches_per_epoch for _, index, _ in micro):  # the step finished an epoch
            self.state.epoch_seconds.append(self.state.train_seconds - sum(self.state.epoch_seconds))
        epoch, index, _ = micro[-1]
        if index + 1 >= self.batches_per_epoch:
            self.state.epoch, self.state.batch_in_epoch = epoch + 1, 0
        else:
            self.state.epoch, self.state.batch_in_epoch = epoch, index + 1

    def _log_train(self, loss: float) -> None:
        lr = self.scheduler.get_last_lr()[0]
        self.state.loss_curve.append([self.state.step, loss])
        self._append_log({"step": self.state.step, "split": "train", "loss": loss, "lr": lr,
                          "tokens_per_s": self.state.input_tokens / max(self.state.train_seconds, 1e-9),
                          "epoch": self.state.epoch + self.state.batch_in_epoch / self.batches_per_epoch})

    def _append_log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:  # one writer: rank 0 (every rank holds the same values)
            self.log.append(record)

    def _maybe_validate_and_save(self) -> None:
        step, last = self.state.step, self.state.step == self.total_steps
        validate = bool(self.val_data) and ((self.cfg.eval_every and step % self.cfg.eval_every == 0) or last)
        if validate:
            self._validate()
        if validate or last or (self.cfg.save_every and step % self.cfg.save_every == 0):
            self.save()

    def _validate(self) -> None:
        val_loss = self.validation_loss()
        record: dict[str, Any] = {"step": self.state.step, "loss": val_loss}
        # Generation metrics run on rank 0 alone (the others wait at their next collective); with FSDP shards a
        # lone rank cannot run the model, so they are skipped during training (the final evaluation still runs).
        if self.metric_fn is not None and self.cfg.eval_examples > 0 and self.dist.is_main and not self.sharded:
            with eager() if self.cfg.compile else contextlib.nullcontext():  # generation: not what was compiled
                record.update(self.metric_fn())
            self.model.train()
        self.state.val_curve.append(record)
        self._append_log({"split": "validation", **record})
        if self.state.best_val_loss is None or val_loss < self.state.best_val_loss:
            self.state.best_val_loss, self.state.best_step, self.state.bad_validations = val_loss, self.state.step, 0
            self.best_weights = {k: v.detach().clone() for k, v in self.params.items()}
        else:
            self.state.bad_validations += 1
            if self.cfg.patience and self.state.bad_validations >= self.cfg.patience:
                self.state.stopped_early = True
                self._append_log({"step": self.state.step, "split": "train", "event": "early_stop",
                                  "best_step": self.state.best_step})

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean target-token cross-entropy over the validation examples (teacher forced); with several processes
        each rank scores its share of every batch and the sums are all-reduced (the same value on every rank)."""
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0.0
        order = sorted(range(len(self.val_data)), key=lambda i: len(self.val_data[i].input_ids))
        for start in range(0, len(order), self.cfg.batch_size):
            batch, weight, _ = self._local_batch(self.val_data, order[start:start + self.cfg.batch_size])
            loss_sum, n = self._forward_loss(batch)
            total, count = total + weight * float(loss_sum), count + weight * n
        total, count = self.dist.sum_floats([total, count])
        self.model.train(was_training)
        return total / max(count, 1)

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def full_weights(self) -> dict[str, torch.Tensor]:
        """The trainable parameters as whole tensors (FSDP shards gathered: every rank must call this)."""
        return {name: D.full_tensor(p) for name, p in self.params.items()}

    def save(self) -> Path:
        """Write a checkpoint (rank 0; sharded state is gathered first, so every rank must call this)."""
        best = None if self.best_weights is None else {k: D.full_tensor(v) for k, v in self.best_weights.items()}
        optimizer = D.gather_optimizer_state(self.optimizer) if self.sharded else self.optimizer.state_dict()
        trainer_state = {"optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                         "rng": torch.get_rng_state()}
        if self.dist.enabled:  # dropout draws differ per rank: an exact resume restores each rank's own stream
            trainer_state["rng_per_rank"] = self.dist.gather_objects(torch.get_rng_state())
        weights = self.full_weights()
        self.state.wall_seconds = self.earlier_wall_seconds + (time.time() - self.started)
        if self.dist.is_main:
            # The log is fsynced first, so the length recorded is on disk whenever the checkpoint is.
            save_checkpoint(self.out_dir, self.state.step, weights, best, trainer_state,
                            {"train_state": asdict(self.state), "world_size": self.dist.world_size,
                             "metrics_bytes": self.log.sync()})
        self.dist.barrier()  # nobody runs ahead of a checkpoint that is not on disk yet
        return self.out_dir / "checkpoints" / f"step-{self.state.step:07d}"

    def _like_params(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Unknown keys pass through, so the method's own check names them.
        return {k: D.like_param(v, self.params[k]) if k in self.params else v for k, v in state.items()}

    def resume(self) -> bool:
        """Load the latest checkpoint in ``out_dir``; returns False when there is none."""
        folder = latest_checkpoint(self.out_dir)
        if folder is None:
            return False
        weights, best, trainer_state, state = load_checkpoint(folder)
        # Checkpoints hold whole tensors whatever the world size; sharded parameters take their own shard.
        self.method.load_adapter_state_dict(self._like_params(weights))
        self.best_weights = None if best is None else self._like_params(best)
        self.optimizer.load_state_dict(trainer_state["optimizer"])
        if self.sharded:
            D.shard_optimizer_state(self.optimizer)
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        per_rank = trainer_state.get("rng_per_rank")
        same_world = per_rank is not None and len(per_rank) == self.dist.world_size
        torch.set_rng_state(per_rank[self.dist.rank] if same_world else trainer_state["rng"])
        self.state = TrainState(**state["train_state"])
        self.earlier_wall_seconds = self.state.wall_seconds
        if self.dist.is_main and "metrics_bytes" in state:
            self.log.truncate_to(state["metrics_bytes"])
        elif self.dist.is_main:
            self.log.truncate_after(self.state.step)
        return True
