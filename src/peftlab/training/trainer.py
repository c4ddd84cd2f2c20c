"""One explicit training loop: AdamW over the method's trainable parameters, warmup + schedule, gradient
accumulation normalised by target tokens, clipping, bf16 autocast, validation with early stopping and restore of
the best weights, atomic checkpoints and exact resume.

Resume is exact on CPU: the batch order is a pure function of (seed, epoch), the position in it is checkpointed, and
so are the optimizer, scheduler and torch RNG states, so an interrupted run continued with ``resume=true`` ends with
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from peftlab.config import TrainConfig
from peftlab.data.batching import collate, length_bucketed_batches
from peftlab.data.encode import EncodedExample
from peftlab.methods.base import PeftMethod
from peftlab.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from peftlab.training.loss import IGNORE_INDEX, target_only_loss
from peftlab.training.metrics_log import MetricsLog
from peftlab.training.schedule import lr_lambda


@dataclass
class TrainState:
    """Everything about the loop's progress that a checkpoint must carry."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    input_tokens: int = 0
    target_tokens: int = 0
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


class Interrupt(Exception):
    """Raised by a step callback to stop training abruptly (used to test resume)."""


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
    """

    def __init__(self, method: PeftMethod, train_data: list[EncodedExample], val_data: list[EncodedExample],
                 cfg: TrainConfig, out_dir: str | Path, pad_id: int, lr: float,
                 metric_fn: Callable[[], dict[str, float]] | None = None, device: torch.device | str = "cpu",
                 on_step: Callable[[TrainState], None] | None = None, autocast_bf16: bool = False) -> None:
        if not train_data:
            raise ValueError("no training examples (check data.path, data.train_split and data.max_train)")
        self.method, self.model = method, method.model
        self.train_data, self.val_data, self.cfg = train_data, val_data, cfg
        self.out_dir, self.pad_id, self.lr, self.device = Path(out_dir), pad_id, lr, torch.device(device)
        self.metric_fn, self.on_step = metric_fn, on_step
        self.autocast = autocast_bf16 or cfg.bf16
        self.params = method.trainable_parameters()
        if not self.params:
            raise ValueError("the method has no trainable parameters")
        decay = [p for p in self.params.values() if p.ndim >= 2]
        no_decay = [p for p in self.params.values() if p.ndim < 2]  # biases, norms, IA3-style scale vectors
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=lr)
        self.lengths = [len(e.input_ids) for e in train_data]
        self.batches_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.batches_per_epoch / cfg.grad_accum))
        warmup = cfg.warmup_steps or int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.schedule, warmup, self.total_steps))
        self.state = TrainState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.log = MetricsLog(self.out_dir / "metrics.jsonl")

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

    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        inputs = self.method.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return target_only_loss(self.model, inputs)

    # ---- the loop ------------------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        """Train to ``total_steps`` (or early stop), then restore the best validated weights."""
        if self.state.step == 0:
            self.log.truncate_after(0)
        stream = self._micro_batches()
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step", dynamic_ncols=True,
                   mininterval=1.0)
        self.model.train()
        while self.state.step < self.total_steps and not self.state.stopped_early:
            t0 = time.perf_counter()
            micro = [next(stream) for _ in range(self.cfg.grad_accum)]
            batches = [self._to_device(collate([self.train_data[i] for i in idx], self.pad_id)) for _, _, idx in micro]
            step_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
            step_loss = 0.0
            for batch in batches:
                loss_sum, _ = self._forward_loss(batch)
                (loss_sum / max(step_targets, 1)).backward()
                step_loss += float(loss_sum.detach())
                self.state.input_tokens += int(batch["attention_mask"].sum())
            if self.cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
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
        bar.close()
        if self.best_weights is not None:
            self.method.load_adapter_state_dict(self.best_weights)
        self.model.eval()
        return self.state

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
        self.log.append({"step": self.state.step, "split": "train", "loss": loss, "lr": lr,
                         "tokens_per_s": self.state.input_tokens / max(self.state.train_seconds, 1e-9),
                         "epoch": self.state.epoch + self.state.batch_in_epoch / self.batches_per_epoch})

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
        if self.metric_fn is not None and self.cfg.eval_examples > 0:
            record.update(self.metric_fn())
            self.model.train()
        self.state.val_curve.append(record)
        self.log.append({"split": "validation", **record})
        if self.state.best_val_loss is None or val_loss < self.state.best_val_loss:
            self.state.best_val_loss, self.state.best_step, self.state.bad_validations = val_loss, self.state.step, 0
            self.best_weights = {k: v.detach().clone() for k, v in self.params.items()}
        else:
            self.state.bad_validations += 1
            if self.cfg.patience and self.state.bad_validations >= self.cfg.patience:
                self.state.stopped_early = True
                self.log.append({"step": self.state.step, "split": "train", "event": "early_stop",
                                 "best_step": self.state.best_step})

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean target-token cross-entropy over the validation examples (teacher forced)."""
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        order = sorted(range(len(self.val_data)), key=lambda i: len(self.val_data[i].input_ids))
        for start in range(0, len(order), self.cfg.batch_size):
            chunk = [self.val_data[i] for i in order[start:start + self.cfg.batch_size]]
            loss_sum, n = self._forward_loss(self._to_device(collate(chunk, self.pad_id)))
            total, count = total + float(loss_sum), count + n
        self.model.train(was_training)
        return total / max(count, 1)

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def save(self) -> Path:
        trainer_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                         "rng": torch.get_rng_state()}
        return save_checkpoint(self.out_dir, self.state.step, self.params, self.best_weights, trainer_state,
                               {"train_state": asdict(self.state)})

    def resume(self) -> bool:
        """Load the latest checkpoint in ``out_dir``; returns False when there is none."""
        folder = latest_checkpoint(self.out_dir)
        if folder is None:
            return False
        weights, best, trainer_state, state = load_checkpoint(folder)
        self.method.load_adapter_state_dict(weights)
        self.best_weights = best
        self.optimizer.load_state_dict(trainer_state["optimizer"])
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        torch.set_rng_state(trainer_state["rng"])
        self.state = TrainState(**state["train_state"])
        self.log.truncate_after(self.state.step)
        return True
