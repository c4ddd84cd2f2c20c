"""Speed workers (b) and (c): Hugging Face PEFT + ``transformers.Trainer`` on the same prepared data.

* ``--recipe trainer`` (b), what a careful user writes: PEFT for LoRA / prompt tuning / prefix tuning (the
  last layer and full fine-tuning by hand: freeze, untie the head, unfreeze), ``DataCollatorForSeq2Seq``
  dynamic padding to the longest sequence of each batch, labels -100 on prompt and padding.
* ``--recipe course`` (c), the course reports' recipe this project started from: the same model set-up, but every
  example padded to ``max_length`` (prompt cap + target cap) beforehand and batched with
  ``default_data_collator``; the model's own loss over all positions, labels -100 on prompt and padding.

Both: AdamW (``optim="adamw_torch"``, the same ``torch.optim.AdamW`` peftlab uses), the same learning rate, linear
schedule over ``warmup + steps + 1`` steps, clipping at 1.0, batch size from the data file, no gradient accumulation,
no evaluation, no saving, logging off, ``dataloader_num_workers=0``. The examples are laid out in peftlab's batch
order and read with ``train_sampling_strategy="sequential"``, so every step sees the batch peftlab's step sees.
``--dtype bf16``: base weights loaded in bf16, trained weights kept in fp32, ``bf16=True`` (autocast), as peftlab.

The window is timed by a ``TrainerCallback.on_step_end``; real tokens (attention-mask sum before any virtual
tokens) and target tokens are counted in ``training_step``. Prints one ``SPEED_RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import torch
from speed_common import (
    DTYPES,
    MemoryProbe,
    StepWindow,
    WorkCounter,
    apply_reference,
    check_worker_args,
    choice,
    emit,
    load_prepared,
    method_lr,
    model_facts,
    ordered_examples,
    run_facts,
    worker_parser,
)
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from peftlab.models.loading import pretrained_source

RECIPES = ("trainer", "course")


class ListDataset(torch.utils.data.Dataset):
    """Feature dicts in a fixed order (the sequential sampler reads them as laid out)."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


def features(examples: list[dict[str, list[int]]], recipe: str, max_length: int, pad_id: int) -> list[dict]:
    """Trainer features: as they are (dynamic padding later), or padded to ``max_length`` (course recipe)."""
    rows = []
    for e in examples:
        ids, labels = e["input_ids"], e["labels"]
        pad = max_length - len(ids) if recipe == "course" else 0
        if pad < 0:
            raise SystemExit(f"an example has {len(ids)} tokens, more than max_length {max_length}")
        rows.append({"input_ids": ids + [pad_id] * pad, "attention_mask": [1] * len(ids) + [0] * pad,
                     "labels": labels + [-100] * pad})
    return rows


class CountingTrainer(Trainer):
    """``Trainer`` plus token counters in ``training_step`` (device tensors, read only at window boundaries)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.real_tokens: torch.Tensor | int = 0
        self.target_tokens: torch.Tensor | int = 0

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        self.real_tokens = self.real_tokens + inputs["attention_mask"].sum()
        self.target_tokens = self.target_tokens + (inputs["labels"][:, 1:] != -100).sum()
        return super().training_step(model, inputs, num_items_in_batch)


class WindowCallback(TrainerCallback):
    """Feeds step ends to the :class:`StepWindow` and stops training right after the window."""

    def __init__(self, window: StepWindow, totals: Any) -> None:
        self.window, self.totals = window, totals

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> Any:
        self.window.on_step_end(state.global_step, self.totals)
        if self.window.done(state.global_step):
            control.should_training_stop = True
        return control


def training_arguments(args: argparse.Namespace, batch_size: int, device: torch.device) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(args.workdir), per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps + 1, learning_rate=method_lr(args.method), weight_decay=0.0,
        lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, optim="adamw_torch",
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, train_sampling_strategy="sequential", remove_unused_columns=False,
        seed=args.seed, data_seed=args.seed, bf16=args.dtype == "bf16", use_cpu=device.type == "cpu")


def load_reference_model(args: argparse.Namespace) -> tuple[nn.Module, nn.Module, Any]:
    """(model handed to the Trainer, the underlying base model, tokenizer)."""
    source = pretrained_source(args.model)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[args.dtype])
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    wrapped = apply_reference(model, args.method)
    for p in wrapped.parameters():  # trained weights stay fp32 (master weights) over a bf16 base, as in peftlab
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return wrapped, model, tokenizer


def main(argv: list[str] | None = None) -> dict:
    """Train with the Trainer, measure the window, print and return the record."""
    parser = worker_parser(__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="trainer", help="trainer (b: dynamic padding) | course (c: max_length)")
    args = parser.parse_args(argv)
    check_worker_args(args)
    choice(args.recipe, RECIPES, "--recipe")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft 0.21 on transformers 5
    data = load_prepared(args.data)
    device = torch.device(args.device)
    model, base, tokenizer = load_reference_model(args)
    model.to(device)  # before the memory mark, as peftlab's build() does (the Trainer would move it later)
    trainable = [p for p in model.parameters() if p.requires_grad]
    facts = model_facts(base, trainable)
    rows = features(ordered_examples(data, args.warmup, args.steps), args.recipe, data["max_length"], data["pad_id"])
    collator = (default_data_collator if args.recipe == "course"
                else DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100))
    memory = MemoryProbe(device)
    memory.mark_loaded()
    counter = WorkCounter(base)
    window = StepWindow(args.warmup, args.steps, device)
    trainer = CountingTrainer(model=model, args=training_arguments(args, data["batch_size"], device),
                              train_dataset=ListDataset(rows), data_collator=collator)

    def totals() -> dict[str, int]:
        return {"real_tokens": int(trainer.real_tokens), "target_tokens": int(trainer.target_tokens),
                **counter.totals()}

    trainer.add_callback(WindowCallback(window, totals))
    trainer.train()
    variant = "course" if args.recipe == "course" else "trainer"
    record = {**run_facts(args, variant, data), **facts, **window.result(), **memory.report(),
              "max_length": data["max_length"] if args.recipe == "course" else None}
    emit(record)
    return record


if __name__ == "__main__":
    main()
