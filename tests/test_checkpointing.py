"""Block-level gradient checkpointing (``checkpoint_blocks``, ``train.gradient_checkpointing``) for every method.

Checkpointing must change memory, never numbers: for every registered method on tiny GPT-2 and tiny Llama the loss
and every trainable gradient equal those without it, while the blocks really are replayed in the backward pass.
Prefix tuning, whose prefixes live in the KV cache, is the case Hugging Face's own checkpointing cannot handle.
"""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_FACTORIES, tiny_gpt2, tiny_llama, toy_examples
from method_cases import CASES, case_of, method_params
from torch import nn
from transformers import DynamicCache

from peftlab.config import TrainConfig
from peftlab.data.encode import EncodedExample
from peftlab.evaluation.generate import greedy_generate
from peftlab.methods import PeftMethod, get_method
from peftlab.models import arch
from peftlab.models.checkpointing import blocks_checkpointed, checkpoint_blocks
from peftlab.training.loss import target_only_loss
from peftlab.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

def build(name: str, family: str) -> PeftMethod:
    """A fresh tiny model with the shared case ``name`` (tests/method_cases.py) applied and its trainable weights
    moved off their init (LoRA's B = 0 would leave A's gradient zero, which would compare nothing)."""
    model = MODEL_FACTORIES[family]()
    spec = get_method(CASES[name].method)
    torch.manual_seed(3)
    method = spec.apply(model, spec.build_config(dict(CASES[name].options)))
    with torch.no_grad():
        for p in method.trainable_parameters().values():
            p.add_(0.05 * torch.randn_like(p))
    return method


def count_attention_calls(model: nn.Module) -> list[int]:
    """A one-item counter of attention-module calls (a replayed block calls its attention again)."""
    calls = [0]
    for name in arch.sublayer_names(model, "attn"):
        model.get_submodule(name).register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def loss_and_grads(name: str, family: str, batch: dict, checkpointed: bool) -> tuple[torch.Tensor, dict, int]:
    method = build(name, family)
    model = method.model
    if checkpointed:
        assert checkpoint_blocks(model) == 2
    calls = count_attention_calls(model)
    model.train()
    torch.manual_seed(4)  # the same dropout masks in both runs (checkpoint restores the RNG for its replay)
    loss, _ = target_only_loss(model, method.prepare_inputs(batch["input_ids"], batch["attention_mask"],
                                                            batch["labels"]))
    loss.backward()
    grads = {k: p.grad for k, p in method.trainable_parameters().items()}
    return loss.detach(), grads, calls[0]


@pytest.mark.parametrize(("name", "family"), method_params())
def test_loss_and_gradients_equal_without_checkpointing(name, family, batch):
    case_of(name, family)
    loss, grads, calls = loss_and_grads(name, family, batch, checkpointed=False)
    ck_loss, ck_grads, ck_calls = loss_and_grads(name, family, batch, checkpointed=True)
    torch.testing.assert_close(ck_loss, loss, rtol=0, atol=1e-6)
    assert grads.keys() == ck_grads.keys()
    assert any(grad.abs().sum() > 0 for grad in grads.values())
    for key, grad in grads.items():
        torch.testing.assert_close(ck_grads[key], grad, rtol=1e-5, atol=1e-6, msg=key)
    assert calls == 2
    # Blocks with something to differentiate are replayed; last-layer trains only the head, so nothing is.
    assert ck_calls == (2 if name == "last-layer" else 3 if name == "last-blocks" else 4)


@pytest.mark.parametrize("family", sorted(MODEL_FACTORIES))
def test_fewer_activations_are_kept(family, batch):
    """The tensors autograd saves outside the checkpointed blocks, summed, with and without checkpointing."""
    saved = {}
    for checkpointed in (False, True):
        method = build("lora", family)
        checkpoint_blocks(method.model, enabled=checkpointed)
        method.model.train()
        total = [0]

        def pack(t: torch.Tensor, total: list[int] = total) -> torch.Tensor:
            total[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = target_only_loss(method.model, method.prepare_inputs(**batch))
        loss.backward()
        saved[checkpointed] = total[0]
    assert saved[True] < saved[False] / 2, saved


@pytest.mark.parametrize("name", ["prefix-tuning", "lora", "prompt-tuning"])
@pytest.mark.parametrize("family", sorted(MODEL_FACTORIES))
def test_eval_forward_and_generation_are_unchanged(name, family, batch):
    method = build(name, family)
    model = method.model.eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]

    def outputs() -> tuple[torch.Tensor, list[list[int]]]:
        with torch.no_grad():
            logits = model(**method.prepare_inputs(batch["input_ids"], batch["attention_mask"])).logits
        return logits, greedy_generate(method, prompts, 1, {1}, 6, torch.device("cpu"))

    calls = count_attention_calls(model)
    logits, generated = outputs()
    plain_calls, calls[0] = calls[0], 0
    checkpoint_blocks(model)
    ck_logits, ck_generated = outputs()
    assert torch.equal(ck_logits, logits) and ck_generated == generated
    assert sum(map(len, generated)) > 0
    assert calls[0] == plain_calls  # no replays


def test_enabled_false_removes_the_wrapper(batch):
    model = tiny_gpt2()
    blocks = arch.transformer_blocks(model)
    assert checkpoint_blocks(model) == 2 and checkpoint_blocks(model) == 2  # idempotent: wrapped once
    assert all(b.forward.previous is None for b in blocks)
    assert checkpoint_blocks(model, enabled=False) == 0 and blocks_checkpointed(model) == 0
    assert all("forward" not in b.__dict__ for b in blocks)
    calls = count_attention_calls(model)
    model.train()
    model(**batch).loss.sum().backward()
    assert calls[0] == 2  # no replay once removed
    # An instance-level forward set by someone else (e.g. accelerate's hooks) is wrapped, then given back.
    own = blocks[0].forward = lambda *args, **kwargs: type(blocks[0]).forward(blocks[0], *args, **kwargs)
    checkpoint_blocks(model)
    assert blocks[0].forward.previous is own
    checkpoint_blocks(model, enabled=False)
    assert blocks[0].forward is own


def test_plain_training_forward_with_a_model_made_cache(batch):
    """``model(**batch)`` in training mode makes an empty DynamicCache (use_cache defaults to true): it is dropped
    inside checkpointed blocks, as Hugging Face's checkpointing drops it, and the loss is unchanged."""
    losses = []
    for checkpointed in (False, True):
        model = tiny_llama()
        checkpoint_blocks(model, enabled=checkpointed)
        model.train()
        losses.append(model(**batch).loss)
        losses[-1].backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-6)


def test_caches_that_a_replay_would_write_twice_are_refused(batch):
    method = build("prefix-tuning", "llama")
    model = method.model
    checkpoint_blocks(model)
    model.train()
    inputs = method.prepare_inputs(batch["input_ids"], batch["attention_mask"])
    assert inputs["cache"].stateless and inputs["cache"].get_seq_length() == 3
    inputs["cache"] = method.prefix_cache(3, stateless=False)  # the generation-time, storing cache
    with pytest.raises(ValueError, match="a second time"):
        model(**inputs)
    filled = DynamicCache(config=model.config)
    for layer in range(2):
        filled.update(torch.zeros(3, 2, 4, 8), torch.zeros(3, 2, 4, 8), layer)
    with pytest.raises(ValueError, match="DynamicCache a second time"):
        model(input_ids=batch["input_ids"], cache=filled)


def test_stateless_prefix_cache_stores_nothing():
    method = build("prefix-tuning", "gpt2")
    cache = method.prefix_cache(2, stateless=True)
    keys = torch.randn(2, 4, 5, 8)
    first = cache.update(keys, keys, 0)
    again = cache.update(keys, keys, 0)
    assert first[0].shape == (2, 4, 3 + 5, 8) and torch.equal(first[0], again[0])
    assert cache.get_seq_length() == 3 and cache.get_mask_sizes(5, 0) == (8, 0)
    assert torch.equal(first[0][:, :, :3], method.prefix_cache(2).layers[0].keys)


def test_hf_checkpointing_is_refused_with_a_pointer_to_ours():
    model = tiny_llama()
    model.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="activation_checkpointing_disable"):
        checkpoint_blocks(model)
    spec = get_method("prefix-tuning")
    with pytest.raises(ValueError, match="train.gradient_checkpointing=true"):
        spec.apply(model, spec.build_config({}))


def toy_data(n: int, seed: int) -> list[EncodedExample]:
    return toy_examples(n, seed, length_spread=4)


def test_trainer_with_gradient_checkpointing_trains_the_same_weights(tmp_path):
    """Prefix tuning through the Trainer (validation in between), with and without the option."""
    runs = {}
    for checkpointed in (False, True):
        method = build("prefix-tuning", "llama")
        start = {k: p.detach().clone() for k, p in method.trainable_parameters().items()}
        cfg = TrainConfig(batch_size=4, max_steps=4, eval_every=2, log_every=1, seed=0,
                          gradient_checkpointing=checkpointed)
        torch.manual_seed(0)
        trainer = Trainer(method, toy_data(12, 0), toy_data(4, 1), cfg, tmp_path / str(checkpointed), pad_id=1,
                          lr=1e-2)
        assert blocks_checkpointed(method.model) == (2 if checkpointed else 0)
        state = trainer.fit()
        assert state.step == 4 and len(state.val_curve) == 2
        weights = {k: p.detach().clone() for k, p in trainer.params.items()}
        assert any(not torch.equal(weights[k], start[k]) for k in start)
        runs[checkpointed] = ([loss for _, loss in state.loss_curve], weights)
    (curve, weights), (ck_curve, ck_weights) = runs[False], runs[True]
    assert len(curve) == 4 and ck_curve == pytest.approx(curve, abs=1e-5)
    for key, value in weights.items():
        torch.testing.assert_close(ck_weights[key], value, rtol=1e-4, atol=1e-5, msg=key)
