"""Speed workers (b) and (c): Hugging Face PEFT + ``transformers.Trainer`` on the same prepared data.

* ``--recipe trainer`` (b), what a careful user writes: PEFT for LoRA / prompt tuning / prefix tuning (the
  last layer and full fine-tuning by hand: freeze, untie the head, unfreeze), ``DataCollatorForSeq2Seq``
  dynamic padding to the longest sequence of each batch, labels -100 on prompt and padding.
  ``model.config.use_cache = False``: a training forward has no use for a KV cache (transformers builds one by
  default, which costs memory and time).
* ``--recipe trainer-expert`` (b'), what an expert writes: (b) plus a collator that passes ``logits_to_keep`` (a
  boolean mask of the positions whose next token is labelled) and ``shift_labels`` (those labels), so the model's
  head and loss run on labelled positions only, as peftlab's do. Same loss value as (b) on the same batch.
* ``--recipe course`` (c), the course reports' recipe this project started from: the same model set-up, but every
  example padded to ``max_length`` (prompt cap + target cap) beforehand and batched with
  ``default_data_collator``; the model's own loss over all positions, labels -100 on prompt and padding. The model
  is left as the course had it (``use_cache`` at the config's default).

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

RECIPES = ("trainer", "trainer-expert", "course")
IGNORE_INDEX = -100


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
                     "labels": labels + [IGNORE_INDEX] * pad})
    return rows


class LabelledHeadCollator:
    """Wraps a collator so that the model computes logits and loss only where the next token is labelled.

    ``logits_to_keep`` as a boolean (B, T') mask makes the causal-LM model slice its hidden states to the kept rows
    (flattened to (N, d)) before ``lm_head``; ``shift_labels`` (N,) are the targets of exactly those rows, so the
    model's ``ForCausalLMLoss`` takes the same cross-entropy over the same N tokens as the full-logits loss.
    ``virtual_tokens``: soft-prompt positions PEFT prepends (prompt tuning) before the model sees the sequence; they
    are never labelled, so the mask gets that many ``False`` columns in front.
    """

    def __init__(self, collator: Any, virtual_tokens: int = 0) -> None:
        self.collator, self.virtual_tokens = collator, virtual_tokens

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(rows)
        return {**batch, **labelled_head_inputs(batch["labels"], self.virtual_tokens)}


def labelled_head_inputs(labels: torch.Tensor, virtual_tokens: int = 0) -> dict[str, torch.Tensor]:
    """``logits_to_keep`` mask (B, virtual + T) and ``shift_labels`` (N,) for labels (B, T) with -100 = ignored."""
    # Position t predicts token t + 1: the last position predicts nothing (as the pad in ForCausalLMLoss).
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
    keep = shifted != IGNORE_INDEX
    if virtual_tokens:
        keep = torch.cat([keep.new_zeros(keep.shape[0], virtual_tokens), keep], dim=1)
    return {"logits_to_keep": keep, "shift_labels": shifted[shifted != IGNORE_INDEX]}


def virtual_token_count(model: nn.Module) -> int:
    """Soft-prompt positions a PEFT prompt-tuning model prepends to every sequence (0 for anything else)."""
    import peft

    config = getattr(model, "peft_config", {}).get("default")
    return config.num_virtual_tokens if config is not None and config.peft_type == peft.PeftType.PROMPT_TUNING else 0


def make_collator(recipe: str, tokenizer: Any, model: nn.Module) -> Any:
    """The batch collator of a recipe (see the module docstring)."""
    if recipe == "course":
        return default_data_collator
    dynamic = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)
    return LabelledHeadCollator(dynamic, virtual_token_count(model)) if recipe == "trainer-expert" else dynamic


class CountingTrainer(Trainer):
    """``Trainer`` plus token counters in ``training_step`` (device tensors, read only at window boundaries)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.real_tokens: torch.Tensor | int = 0
        self.target_tokens: torch.Tensor | int = 0

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        self.real_tokens = self.real_tokens + inputs["attention_mask"].sum()
        self.target_tokens = self.target_tokens + (inputs["labels"][:, 1:] != IGNORE_INDEX).sum()
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
    if args.recipe != "course":  # the course recipe is measured as it was written, cache default and all
        model.config.use_cache = False
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
    parser.add_argument("--recipe", default="trainer", help="trainer (b: dynamic padding) | trainer-expert (b': and "
                                                            "head on labelled positions) | course (c: max_length)")
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
    collator = make_collator(args.recipe, tokenizer, model)
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
    record = {**run_facts(args, args.recipe, data), **facts, **window.result(), **memory.report(),
              "max_length": data["max_length"] if args.recipe == "course" else None}
    emit(record)
    return record


if __name__ == "__main__":
    main()
