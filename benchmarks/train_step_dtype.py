"""Time LoRA training steps on SmolLM2-135M with an fp32 base vs a bf16 base (or bf16 autocast).

Usage: python benchmarks/train_step_dtype.py {fp32|bf16} [METHOD] [--autocast]
Prints per-step seconds and real tokens/s for 4 steps of batch 8 on ../shared/data/e2e_nlg training examples.
"""

from __future__ import annotations

import sys
import time

import torch

from peftlab.config import load_config
from peftlab.data.batching import collate
from peftlab.lab.experiment import build, load_split
from peftlab.training.loss import target_only_loss


def main(dtype: str, method: str, autocast: bool) -> None:
    bf16 = dtype == "bf16"
    overrides = ["data=../shared/data/e2e_nlg", f"method={method}",
                 f"model.dtype={'bfloat16' if bf16 and not autocast else 'float32'}"]
    setup = build(load_config(None, overrides))
    encoded = setup.encoder.encode_many(load_split(setup, "train", 32, sample_seed=0))
    optimizer = torch.optim.AdamW(setup.method.trainable_parameters().values(), lr=1e-4)
    setup.method.model.train()
    for i in range(4):
        batch = collate(encoded[i * 8:(i + 1) * 8], setup.tokenizer.pad_token_id)
        t0 = time.perf_counter()
        inputs = setup.method.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and autocast):
            loss, n = target_only_loss(setup.method.model, inputs)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds = time.perf_counter() - t0
        tokens = int(batch["attention_mask"].sum())
        print(f"step {i} shape {tuple(batch['input_ids'].shape)} {seconds:.2f}s {tokens / seconds:.0f} tok/s")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(args[0] if args else "fp32", args[1] if len(args) > 1 else "lora", "--autocast" in sys.argv)
