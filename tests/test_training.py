"""Training internals: target-only loss, schedules, greedy generation, the loop, checkpoints and exact resume."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_llama

from peftlab.config import TrainConfig
from peftlab.data.encode import EncodedExample
from peftlab.evaluation.generate import greedy_generate
from peftlab.methods import get_method
from peftlab.methods.base import BaseModelHandle
from peftlab.training import checkpoint as ckpt
from peftlab.training.loss import IGNORE_INDEX, sequence_log_probs, target_only_loss
from peftlab.training.schedule import lr_lambda
from peftlab.training.trainer import Interrupt, Trainer


def test_target_only_loss_equals_full_logits_loss(tiny_model, batch):
    loss_sum, n = target_only_loss(tiny_model, batch)
    reference = tiny_model(**batch).loss  # HF: mean CE over labelled positions from full logits
    assert n == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss_sum / n, reference, rtol=1e-5, atol=1e-5)


def test_sequence_log_probs_matches_manual(tiny_model, batch):
    got = sequence_log_probs(tiny_model, batch)
    logp = torch.log_softmax(tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                             -1)
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    picked = logp[:, :-1].gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(got, (picked * mask).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule, expected", [
    ("linear", [0.5, 1.0, 0.75, 0.5, 0.25]),
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
    ("cosine", [0.5, 1.0, 0.853553, 0.5, 0.146447]),
])
def test_schedules(schedule, expected):
    f = lr_lambda(schedule, warmup_steps=1, total_steps=5)
    assert [round(f(s), 6) for s in range(5)] == pytest.approx(expected, abs=1e-6)


def test_greedy_generate_matches_hf_generate(tiny_model):
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    method = BaseModelHandle(tiny_model)
    ours = greedy_generate(method, prompts, pad_id=1, eos_ids={1}, max_new_tokens=6, device=torch.device("cpu"))
    for prompt, row in zip(prompts, ours, strict=True):  # one at a time: no padding in the reference
        ref = tiny_model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=1,
                                  eos_token_id=1)[0, len(prompt):].tolist()
        cut = ref.index(1) if 1 in ref else len(ref)
        assert row == ref[:cut]


def _toy_data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        prompt = torch.randint(2, VOCAB, (4 + i % 5,), generator=g).tolist()
        target = [(t * 7 + 3) % (VOCAB - 2) + 2 for t in prompt[:3]] + [1]  # a learnable mapping
        data.append(EncodedExample(input_ids=prompt + target, labels=[IGNORE_INDEX] * len(prompt) + target))
    return data


def _trainer(tmp_path, on_step=None, **overrides):
    model = tiny_llama()
    spec = get_method("lora")
    method = spec.apply(model, spec.build_config({"r": 4, "dropout": 0.1, "target_modules": ["q", "v"]}))
    settings = {"batch_size": 4, "grad_accum": 2, "max_steps": 8, "eval_every": 3, "log_every": 2, "seed": 0}
    cfg = TrainConfig(**{**settings, **overrides})
    torch.manual_seed(0)
    return Trainer(method, _toy_data(), _toy_data(8, seed=1), cfg, tmp_path, pad_id=1, lr=1e-2, on_step=on_step)


def test_training_lowers_the_loss(tmp_path):
    trainer = _trainer(tmp_path)
    before = trainer.validation_loss()
    state = trainer.fit()
    assert state.step == 8
    assert trainer.validation_loss() < before
    records = trainer.log.records()
    assert [r["step"] for r in records if r.get("split") == "train"] == [2, 4, 6, 8]
    assert (tmp_path / "checkpoints" / "LATEST").exists()


def test_resume_gives_the_same_weights(tmp_path):
    straight = _trainer(tmp_path / "a")
    straight.fit()

    def crash(state):
        if state.step == 5:
            raise Interrupt

    interrupted = _trainer(tmp_path / "b", on_step=crash, save_every=1)
    with pytest.raises(Interrupt):
        interrupted.fit()
    resumed = _trainer(tmp_path / "b", save_every=1)
    assert resumed.resume() and resumed.state.step == 5
    resumed.fit()
    for name, p in straight.params.items():
        torch.testing.assert_close(resumed.params[name], p, rtol=0, atol=0)
    assert resumed.state.loss_curve == straight.state.loss_curve
    assert [r["loss"] for r in resumed.state.val_curve] == [r["loss"] for r in straight.state.val_curve]
    steps = [r["step"] for r in resumed.log.records() if r.get("split") == "train"]
    assert steps == [2, 4, 6, 8]  # no duplicated records after the resume


def test_early_stopping_restores_best_weights(tmp_path):
    trainer = _trainer(tmp_path, patience=1, eval_every=1, max_steps=40)
    trainer.scheduler.base_lrs = [5.0, 5.0]  # diverges within a few steps, so validation loss rises
    state = trainer.fit()
    assert state.stopped_early and state.step < 40
    best = trainer.best_weights
    for name, p in trainer.params.items():
        torch.testing.assert_close(p, best[name])


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)
    trainer.fit()
    before = ckpt.latest_checkpoint(tmp_path)
    assert before is not None
    weights_before = ckpt.load_checkpoint(before)[0]

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_tensors", boom)
    trainer.state.step += 1
    with pytest.raises(OSError):
        trainer.save()
    assert ckpt.latest_checkpoint(tmp_path) == before
    after = ckpt.load_checkpoint(before)[0]
    assert all(torch.equal(after[k], weights_before[k]) for k in after)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
