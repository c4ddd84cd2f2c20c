"""Frozen-trunk caching (``train.cache_frozen_trunk``): last-layer tuning runs the trunk once per training example
and trains what the uncached loop trains; ``auto`` stays off wherever the trunk's features could change."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, toy_examples
from torch import nn

import peftlab.methods  # noqa: F401  registers every method
from peftlab.config import ConfigError, TrainConfig, load_config
from peftlab.data.encode import IGNORE_INDEX, EncodedExample
from peftlab.lab.experiment import train_run
from peftlab.methods import PeftMethod, get_method
from peftlab.models.arch import trunk
from peftlab.training import trunk_cache
from peftlab.training.loss import target_hidden_states
from peftlab.training.trainer import Interrupt, Trainer, TrainState
from peftlab.training.trunk_cache import TrunkCache

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_data(n: int = 16, seed: int = 0) -> list[EncodedExample]:
    """Prompts of 4-8 tokens (different lengths: batches are padded differently each epoch), 4 target tokens."""
    return toy_examples(n, seed, length_spread=5)


def applied(name: str = "last-layer", model: nn.Module | None = None, **options) -> PeftMethod:
    spec = get_method(name)
    return spec.apply(model if model is not None else tiny_llama(), spec.build_config(options))


def trainer(method: PeftMethod, tmp_path, mode: str, on_step=None, **overrides) -> Trainer:
    settings = {"batch_size": 4, "epochs": 3, "log_every": 1, "seed": 0, "cache_frozen_trunk": mode}
    torch.manual_seed(0)
    return Trainer(method, toy_data(), [], TrainConfig(**{**settings, **overrides}), tmp_path / mode, pad_id=1,
                   lr=1e-2, on_step=on_step)


def count_trunk_calls(method: PeftMethod) -> list[int]:
    calls = [0]
    trunk(method.model).register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_cached_training_equals_uncached_training(tmp_path):
    runs = {}
    for mode in ("off", "on"):
        t = trainer(applied(), tmp_path, mode)
        state = t.fit()
        runs[mode] = (state, {k: p.detach().clone() for k, p in t.params.items()})
    (off, off_weights), (on, on_weights) = runs["off"], runs["on"]
    assert not off.trunk_cache and off.trunk_cache_bytes == 0
    targets = sum(sum(t != IGNORE_INDEX for t in e.labels[1:]) for e in toy_data())
    assert on.trunk_cache and on.trunk_cache_bytes == targets * (32 * 4 + 8)  # fp32 (n, 32) hidden + int64 targets
    assert len(off.loss_curve) == len(on.loss_curve) == 12
    # Epoch 1 computes the features in the same batches: the same bits. Later epochs reuse them inside other batches,
    # where a trunk pass over other padding may round the last bit differently.
    assert on.loss_curve[:4] == off.loss_curve[:4]
    assert [loss for _, loss in on.loss_curve] == pytest.approx([loss for _, loss in off.loss_curve], rel=1e-6)
    for name, weight in off_weights.items():
        assert not torch.equal(weight, applied().trainable_parameters()[name])  # training moved the head
        torch.testing.assert_close(on_weights[name], weight, rtol=1e-6, atol=1e-7, msg=name)


def test_the_trunk_runs_only_in_the_first_epoch(tmp_path):
    for mode, per_epoch in (("on", [4, 4, 4]), ("off", [4, 8, 12])):
        method = applied()
        calls, seen = count_trunk_calls(method), []

        def on_step(state: TrainState, calls: list[int] = calls, seen: list[int] = seen) -> None:
            if state.batch_in_epoch == 0:  # the step that ended an epoch (16 examples = 4 batches of 4)
                seen.append(calls[0])

        state = trainer(method, tmp_path, mode, on_step).fit()
        assert seen == per_epoch, mode
        # What the FLOP count charges: every epoch's tokens without the cache, the first epoch's with it.
        assert state.trunk_input_tokens * (3 if mode == "on" else 1) == state.input_tokens, mode


def test_resume_rebuilds_the_cache(tmp_path):
    straight = trainer(applied(), tmp_path / "a", "on")
    straight.fit()

    def crash(state: TrainState) -> None:
        if state.step == 6:  # halfway through epoch 2
            raise Interrupt

    with pytest.raises(Interrupt):
        trainer(applied(), tmp_path / "b", "on", crash, save_every=1).fit()
    method = applied()
    calls = count_trunk_calls(method)
    resumed = trainer(method, tmp_path / "b", "on", save_every=1)
    assert resumed.resume() and resumed.state.step == 6
    state = resumed.fit()
    # Not saved in the checkpoint, the cache refills as rows come round: the 2 batches left in epoch 2 run the trunk,
    # and so do the epoch-3 batches holding a row first seen before the interrupt; the others are served.
    assert state.trunk_cache and len(resumed.trunk_cache) == 16 and 2 < calls[0] < 6
    assert state.loss_curve[:6] == straight.state.loss_curve[:6]
    assert [x for _, x in state.loss_curve] == pytest.approx([x for _, x in straight.state.loss_curve], rel=1e-6)
    for name, weight in straight.params.items():
        torch.testing.assert_close(resumed.params[name], weight, rtol=1e-6, atol=1e-7, msg=name)


def test_auto_turns_on_only_for_a_fixed_trunk(tmp_path, monkeypatch):
    assert trainer(applied(), tmp_path, "auto").trunk_cache is not None
    assert trainer(applied(), tmp_path, "off").trunk_cache is None
    # Tiny GPT-2 keeps GPT-2's dropout (resid/embd/attn 0.1): each epoch would draw other masks.
    gpt2 = applied(model=tiny_gpt2())
    assert gpt2.frozen_trunk() and trunk_cache.trunk_dropout(gpt2.model)
    assert trainer(gpt2, tmp_path, "auto").trunk_cache is None
    quiet = tiny_gpt2()
    quiet.config.attn_pdrop = quiet.config.resid_pdrop = quiet.config.embd_pdrop = 0.0
    for module in quiet.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    assert trainer(applied(model=quiet), tmp_path, "auto").trunk_cache is not None
    # head=tied trains the input embeddings too; LoRA trains the blocks.
    tied = applied(head="tied")
    assert not tied.frozen_trunk() and trainer(tied, tmp_path, "auto").trunk_cache is None
    lora = applied("lora", r=4, dropout=0.0)
    assert not lora.frozen_trunk() and trainer(lora, tmp_path, "auto").trunk_cache is None
    monkeypatch.setattr(trunk_cache, "AUTO_LIMIT_BYTES", 100)  # the toy set needs 64 targets x 32 x 4 bytes
    assert trainer(applied(), tmp_path, "auto").trunk_cache is None


def test_on_requires_a_frozen_trunk_and_warns_about_dropout(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.cache_frozen_trunk=on needs a frozen trunk.*lora_A"):
        trainer(applied("lora", r=4, dropout=0.0), tmp_path, "on")
    with pytest.raises(ConfigError, match=r"train\.cache_frozen_trunk=on .*shares its weight with the input"):
        trainer(applied(head="tied"), tmp_path, "on")
    with pytest.warns(UserWarning, match=r"train\.cache_frozen_trunk=on with dropout.*freeze the dropout sample"):
        assert trainer(applied(model=tiny_gpt2()), tmp_path, "on").trunk_cache is not None


def test_bad_value_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"train\.cache_frozen_trunk: 'maybe' is not one of 'auto', 'on', 'off'"):
        load_config(None, ["method=last-layer", "train.cache_frozen_trunk=maybe"])
    # YAML 1.1 reads a bare on/off as a boolean: it still means on/off.
    assert load_config(None, ["train.cache_frozen_trunk=on"]).train.cache_frozen_trunk == "on"
    assert load_config(None, ["train.cache_frozen_trunk=off"]).train.cache_frozen_trunk == "off"


def test_cache_serves_rows_from_any_batch(batch):
    method = applied()
    model, calls, cache = method.model.train(), count_trunk_calls(method), TrunkCache()
    hidden, targets = target_hidden_states(model, batch)  # rows of 7, 4 and 2 labelled positions
    h, y = cache.features(model, [10, 11, 12], batch)
    assert torch.equal(h, hidden) and torch.equal(y, targets) and len(cache) == 3 and calls[0] == 2
    # Another order (and a zero-weight dummy that repeats a row) is served without a trunk pass.
    row = {k: v[[2, 0, 0]] for k, v in batch.items()}
    h, y = cache.features(model, [12, 10, 10], row)
    assert calls[0] == 2
    assert torch.equal(h, torch.cat([hidden[11:], hidden[:7], hidden[:7]]))
    assert torch.equal(y, torch.cat([targets[11:], targets[:7], targets[:7]]))
    with pytest.raises(ValueError, match="2 example indices for a batch of 3 rows"):
        cache.features(model, [1, 2], batch)


def test_result_records_the_cache(tiny_llama_dir, tmp_path):
    cfg = load_config(None, [f"model={tiny_llama_dir}", "task=table-to-text", "data=demo", "method=last-layer",
                             f"out={tmp_path / 'run'}", "data.max_train=8", "data.max_validation=2",
                             "data.max_test=2", "eval.max_new_tokens=2", "train.epochs=2", "train.batch_size=4",
                             "train.eval_examples=0", "eval.show_examples=0"])
    info = train_run(cfg)["train_info"]
    assert info["trunk_cache"] is True and info["trunk_cache_bytes"] > 0 and info["steps"] == 4
    assert info["train_trunk_tokens"] * 2 == info["train_input_tokens"]  # 2 epochs, the trunk ran in the first
