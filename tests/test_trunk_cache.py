"""Frozen-trunk caching (``train.cache_frozen_trunk``): last-layer tuning runs the trunk once per training example,
last-blocks tuning its frozen bottom blocks, and both train what the uncached loop trains; ``auto`` stays off wherever
the cached features could change."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_FACTORIES, tiny_gpt2, tiny_llama, toy_examples
from method_cases import case_of, method_params
from torch import nn
from transformers import LlamaForCausalLM

import peftlab.methods  # noqa: F401  registers every method
from peftlab.config import ConfigError, TrainConfig, load_config
from peftlab.data.encode import IGNORE_INDEX, EncodedExample
from peftlab.lab.experiment import train_run
from peftlab.methods import PeftMethod, get_method
from peftlab.models.arch import input_embeddings, transformer_blocks, trunk
from peftlab.training import trunk_cache
from peftlab.training.loss import target_hidden_states
from peftlab.training.trainer import Interrupt, Trainer, TrainState
from peftlab.training.trunk_cache import BlockInputCache, TrunkCache

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_data(n: int = 16, seed: int = 0) -> list[EncodedExample]:
    """Prompts of 4-8 tokens (different lengths: batches are padded differently each epoch), 4 target tokens."""
    return toy_examples(n, seed, length_spread=5)


def applied(name: str = "last-layer", model: nn.Module | None = None, **options) -> PeftMethod:
    spec = get_method(name)
    return spec.apply(model if model is not None else tiny_llama(), spec.build_config(options))


def quiet_gpt2() -> nn.Module:
    """Tiny GPT-2 without its dropout (resid/embd/attn 0.1), so its trunk is deterministic in train mode."""
    model = tiny_gpt2()
    model.config.attn_pdrop = model.config.resid_pdrop = model.config.embd_pdrop = 0.0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


QUIET_FACTORIES = {"gpt2": quiet_gpt2, "llama": tiny_llama}


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
    assert trainer(applied(model=quiet_gpt2()), tmp_path, "auto").trunk_cache is not None
    # head=tied trains the input embeddings too; LoRA trains the blocks.
    tied = applied(head="tied")
    assert not tied.frozen_trunk() and trainer(tied, tmp_path, "auto").trunk_cache is None
    lora = applied("lora", r=4, dropout=0.0)
    assert not lora.frozen_trunk() and trainer(lora, tmp_path, "auto").trunk_cache is None
    monkeypatch.setattr(trunk_cache, "AUTO_LIMIT_BYTES", 100)  # the toy set needs 64 targets x 32 x 4 bytes
    assert trainer(applied(), tmp_path, "auto").trunk_cache is None


def test_on_requires_a_frozen_trunk_and_warns_about_dropout(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.cache_frozen_trunk=on needs a frozen trunk.*has neither.*lora_A"):
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
    info = train_run(cfg).train_info
    assert info.trunk_cache is True and info.trunk_cache_bytes > 0 and info.steps == 4
    assert info.train_trunk_tokens * 2 == info.train_input_tokens  # 2 epochs, the trunk ran in the first


# ---- last-blocks: the hidden states entering the first trained block ------------------------------------------


def count_block_calls(model: nn.Module, index: int) -> list[int]:
    calls = [0]
    transformer_blocks(model)[index].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("family", sorted(QUIET_FACTORIES))
def test_block_cache_trains_what_the_uncached_loop_trains(family, tmp_path):
    runs, bottom, top = {}, {}, {}
    for mode in ("off", "on"):
        method = applied("last-blocks", QUIET_FACTORIES[family](), n_blocks=1, head="untied")
        assert method.frozen_blocks() == 1
        bottom[mode], top[mode] = count_block_calls(method.model, 0), count_block_calls(method.model, 1)
        t = trainer(method, tmp_path, mode)
        assert isinstance(t.trunk_cache, BlockInputCache) == (mode == "on")
        state = t.fit()
        runs[mode] = (state, {k: p.detach().clone() for k, p in t.params.items()})
    (off, off_weights), (on, on_weights) = runs["off"], runs["on"]
    # 16 examples, 4 batches per epoch, 3 epochs: the frozen block runs in epoch 1 only; the trained one every step.
    assert (bottom["off"][0], bottom["on"][0], top["off"][0], top["on"][0]) == (12, 4, 12, 12)
    assert on.trunk_cache and on.trunk_cache_bytes == sum(len(e.input_ids) for e in toy_data()) * 32 * 4
    assert on.trunk_input_tokens * 3 == on.input_tokens == off.trunk_input_tokens == off.input_tokens
    assert on.loss_curve[:4] == off.loss_curve[:4]  # epoch 1: the same batches, the same bits
    assert [loss for _, loss in on.loss_curve] == pytest.approx([loss for _, loss in off.loss_curve], rel=1e-6)
    start = applied("last-blocks", QUIET_FACTORIES[family](), n_blocks=1, head="untied").trainable_parameters()
    for name, weight in off_weights.items():
        assert not torch.equal(weight, start[name]), name  # training moved every trained tensor
        torch.testing.assert_close(on_weights[name], weight, rtol=1e-6, atol=1e-7, msg=name)


def test_block_cache_serves_rows_from_any_batch(batch):
    method = applied("last-blocks", tiny_llama(), n_blocks=1)
    model = method.model.train()
    hidden, targets = target_hidden_states(model, batch)  # rows of 7, 4 and 2 labelled positions
    calls, cache = count_block_calls(model, 0), BlockInputCache(1)
    h, y = cache.features(model, [10, 11, 12], batch)
    assert torch.equal(h, hidden) and torch.equal(y, targets) and len(cache) == 3 and calls[0] == 1
    assert cache.nbytes == int(batch["attention_mask"].sum()) * 32 * 4  # real positions only
    # Another order, a narrower batch (row 2 alone is 7 wide) and a repeated row: no bottom-block pass.
    rows = {k: v[[2, 0, 0]] for k, v in batch.items()}
    h, y = cache.features(model, [12, 10, 10], rows)
    assert calls[0] == 1
    torch.testing.assert_close(h, torch.cat([hidden[11:], hidden[:7], hidden[:7]]), rtol=1e-6, atol=1e-6)
    assert torch.equal(y, torch.cat([targets[11:], targets[:7], targets[:7]]))
    h.sum().backward()  # autograd reaches the trained block, not the frozen one
    blocks = transformer_blocks(model)
    assert all(p.grad is not None for p in blocks[1].parameters())
    assert all(p.grad is None for p in blocks[0].parameters())
    left = {k: v.flip(1) for k, v in batch.items()}
    with pytest.raises(ValueError, match="needs right-padded rows"):
        cache.features(model, [10, 11, 12], left)


def test_block_cache_auto_and_on(tmp_path, monkeypatch):
    assert isinstance(trainer(applied("last-blocks", n_blocks=1), tmp_path, "auto").trunk_cache, BlockInputCache)
    # Every block trains, or the head trains as the tied input embedding: nothing below the top blocks is fixed.
    for options, why in (({"n_blocks": 2}, r"in the first block or the input embeddings \(model\.layers\.0\."),
                         ({"n_blocks": 1, "head": "tied"}, "shares its weight with the input embeddings")):
        method = applied("last-blocks", **options)
        assert method.frozen_blocks() == 0 and trainer(method, tmp_path, "auto").trunk_cache is None
        with pytest.raises(ConfigError, match=r"or frozen lower blocks .* has neither: .*" + why):
            trainer(method, tmp_path, "on")
    gpt2 = applied("last-blocks", tiny_gpt2(), n_blocks=1)  # GPT-2's dropout: auto stays off, on warns
    assert trainer(gpt2, tmp_path, "auto").trunk_cache is None
    with pytest.warns(UserWarning, match="freeze the dropout sample"):
        assert trainer(gpt2, tmp_path, "on").trunk_cache is not None
    monkeypatch.setattr(trunk_cache, "AUTO_LIMIT_BYTES", 1000)  # the toy set needs 158 positions x 32 x 4 bytes
    assert trainer(applied("last-blocks", n_blocks=1), tmp_path, "auto").trunk_cache is None


@pytest.mark.parametrize(("case_id", "family"), method_params())
def test_frozen_blocks_is_what_the_method_declares(case_id, family):
    """Every method's frozen_blocks() k holds: nothing trains in the embeddings or blocks 0..k-1, and the inputs pass
    unchanged (k = 0 is always true)."""
    case = case_of(case_id, family)
    spec = get_method(case.method)
    method = spec.apply(MODEL_FACTORIES[family](), spec.build_config(dict(case.options)))
    k = method.frozen_blocks()
    if k == 0:
        return
    trained = {id(p) for p in method.trainable_parameters().values()}
    frozen = [input_embeddings(method.model), *transformer_blocks(method.model)[:k]]
    assert not any(id(p) in trained or p.requires_grad for m in frozen for p in m.parameters())
    ids, mask = torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)
    assert set(method.prepare_inputs(ids, mask)) == {"input_ids", "attention_mask"}


def test_result_charges_the_cached_blocks_once(tiny_llama_dir, tmp_path):
    cfg = load_config(None, [f"model={tiny_llama_dir}", "task=table-to-text", "data=demo", "method=last-blocks",
                             "method.n_blocks=1", f"out={tmp_path / 'run'}", "data.max_train=8",
                             "data.max_validation=2", "data.max_test=2", "eval.max_new_tokens=2", "train.epochs=2",
                             "train.batch_size=4", "train.eval_examples=0", "eval.show_examples=0"])
    info = train_run(cfg).train_info
    assert info.trunk_cache is True and info.trunk_cache_bytes > 0 and info.steps == 4
    assert info.train_trunk_tokens * 2 == info.train_input_tokens
    # Block 0 is frozen: a forward per token that ran it (the first epoch's). Block 1 and the final norm (32 weights)
    # train: forward, activation and weight gradients per input token. The frozen tied head: forward and activation
    # gradient per target token.
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    block, head = sum(p.numel() for p in model.model.layers[0].parameters()), model.lm_head.weight.numel()
    assert info.trainable_params == block + 32
    assert info.train_flops_estimate == (info.train_trunk_tokens * 2 * block
                                         + info.train_input_tokens * (4 * block + 2 * (block + 32))
                                         + info.train_target_tokens * 4 * head)
