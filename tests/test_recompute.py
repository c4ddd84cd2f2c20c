"""Elementwise recomputation (``recompute_elementwise``, ``train.recompute_elementwise``) for every method.

It must change memory, never numbers: for every registered method on tiny GPT-2 and tiny Llama the loss and every
trainable gradient equal the plain path's, bitwise where no norm weight trains (the recomputation runs the same
operations on the same inputs) and within float summation order where one does (the norm's input gradient is then
one sum of its two terms before it meets the residual's). Meanwhile fewer d_ff-wide tensors are really kept.
"""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_FACTORIES, tiny_llama, toy_examples
from method_cases import CASES, case_of, method_params
from torch import nn

from peftlab.config import TrainConfig
from peftlab.methods import PeftMethod, get_method
from peftlab.models.checkpointing import checkpoint_blocks
from peftlab.models.recompute import elementwise_recomputed, recompute_elementwise
from peftlab.training.loss import target_only_loss
from peftlab.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

EXTRA_CASES = {  # wrappers on every MLP projection that the shared table does not cover
    "dora-all-linear": ("lora", {"r": 4, "target_modules": "all-linear", "use_dora": True}),
    "lora-all-linear-no-dropout": ("lora", {"r": 4, "target_modules": "all-linear"}),
    "ia3-down": ("ia3", {"target_modules": ["down"]}),
}


def build(name: str, family: str, options: dict | None = None) -> PeftMethod:
    """A fresh tiny model with case ``name`` applied and its trainable weights moved off their init (LoRA's B = 0
    would leave A's gradient zero, which would compare nothing)."""
    method_name, default = EXTRA_CASES[name] if name in EXTRA_CASES else (CASES[name].method, CASES[name].options)
    model = MODEL_FACTORIES[family]()
    spec = get_method(method_name)
    torch.manual_seed(3)
    method = spec.apply(model, spec.build_config(dict(options if options is not None else default)))
    with torch.no_grad():
        for p in method.trainable_parameters().values():
            p.add_(0.05 * torch.randn_like(p))
    return method


def norm_trains(model: nn.Module) -> bool:
    return any(p.requires_grad for m in model.modules() if "Norm" in type(m).__name__ for p in m.parameters())


def loss_and_grads(method: PeftMethod, batch: dict, bf16: bool = False) -> tuple[torch.Tensor, dict]:
    model = method.model.train()
    torch.manual_seed(4)  # the same dropout masks in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, _ = target_only_loss(model, method.prepare_inputs(batch["input_ids"], batch["attention_mask"],
                                                                batch["labels"]))
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in method.trainable_parameters().items()}


def assert_same(name: str, family: str, batch: dict, *, bf16: bool = False, checkpoint: str = "") -> None:
    """Plain vs recomputed (with gradient checkpointing installed before or after when ``checkpoint`` says so)."""
    plain = build(name, family)
    loss, grads = loss_and_grads(plain, batch, bf16)
    method = build(name, family)
    if checkpoint == "before":
        checkpoint_blocks(method.model)
    assert recompute_elementwise(method.model) == 2
    if checkpoint == "after":
        checkpoint_blocks(method.model)
    re_loss, re_grads = loss_and_grads(method, batch, bf16)
    assert torch.equal(re_loss, loss), (re_loss, loss)
    assert grads.keys() == re_grads.keys() and any(g.abs().sum() > 0 for g in grads.values())
    exact = not norm_trains(method.model) and not checkpoint
    for key, grad in grads.items():
        if exact:
            assert torch.equal(re_grads[key], grad), (key, (re_grads[key] - grad).abs().max())
        else:
            torch.testing.assert_close(re_grads[key], grad, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize(("name", "family"), method_params())
def test_loss_and_gradients_equal_the_plain_path(name, family, batch):
    case_of(name, family)
    assert_same(name, family, batch)


@pytest.mark.parametrize("name", sorted(EXTRA_CASES))
@pytest.mark.parametrize("family", sorted(MODEL_FACTORIES))
def test_wrappers_on_every_projection(name, family, batch):
    assert_same(name, family, batch)


@pytest.mark.parametrize("name", ["lora", "dora-all-linear", "ia3", "adapter-houlsby", "prompt-tuning", "full"])
@pytest.mark.parametrize("family", sorted(MODEL_FACTORIES))
def test_bf16_autocast(name, family, batch):
    assert_same(name, family, batch, bf16=True)


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("name", ["lora", "prefix-tuning", "full"])
def test_with_gradient_checkpointing_installed_before_or_after(name, order, batch):
    assert_same(name, "llama", batch, checkpoint=order)


def kept_tensors(method: PeftMethod, batch: dict) -> list[torch.Size]:
    """Shapes of the activations autograd really keeps for one training forward (each storage once, weights
    excluded), seen by saved-tensor hooks around the whole forward; the recipe hooks hand every kept tensor on."""
    weights = {p.untyped_storage().data_ptr() for p in method.model.parameters()}
    seen: dict[int, torch.Size] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in weights:
            seen.setdefault(key, t.shape)
        return t

    method.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = target_only_loss(method.model, method.prepare_inputs(**batch))
    loss.backward()
    return list(seen.values())


@pytest.mark.parametrize(("family", "d_ff", "plain_ff", "recomputed_ff"), [
    ("llama", 64, 4, 2),  # g, act(g), u, p (LoRA on down keeps its input) -> g, u
    ("gpt2", 128, 5, 1),  # h, tanh(.), h/2, 1 + tanh(.) of the tanh-GELU, and c_proj's LoRA input -> h
])
def test_fewer_activations_are_kept(family, d_ff, plain_ff, recomputed_ff, batch):
    kept = {}
    for on in (False, True):
        method = build("lora", family, {"r": 4, "target_modules": "all-linear"})
        recompute_elementwise(method.model, enabled=on)
        kept[on] = kept_tensors(method, batch)
    wide = {on: sum(len(s) > 0 and s[-1] == d_ff for s in shapes) for on, shapes in kept.items()}
    assert wide == {False: 2 * plain_ff, True: 2 * recomputed_ff}, wide
    # The norms' outputs that LoRA on q/k/v/gate/up kept are recipes now: fewer d_model-wide tensors too.
    narrow = {on: sum(len(s) > 0 and s[-1] == 32 for s in shapes) for on, shapes in kept.items()}
    assert narrow[True] < narrow[False], narrow


def test_outputs_nothing_keeps_are_freed_after_the_forward(batch):
    """With LoRA on q, v only, the frozen down projection's input is kept by nothing: it must be gone once the
    forward has returned (a recipe registry that outlived the block's forward once kept it alive)."""
    import weakref

    method = build("lora", "llama", {"r": 4, "target_modules": ["q", "v"]})
    recompute_elementwise(method.model)
    inputs = []
    for block in method.model.model.layers:
        block.mlp.down_proj.register_forward_hook(lambda _m, args, _out: inputs.append(weakref.ref(args[0])))
    method.model.train()
    loss, _ = target_only_loss(method.model, method.prepare_inputs(**batch))
    assert len(inputs) == 2 and all(ref() is None for ref in inputs)
    loss.backward()


@pytest.mark.parametrize("family", sorted(MODEL_FACTORIES))
def test_eval_forward_unchanged_and_removal(family, batch):
    method = build("lora", family)
    model = method.model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    assert recompute_elementwise(model) == 2 and recompute_elementwise(model) == 2  # idempotent
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits)
    checkpoint_blocks(model)  # on top: removal reaches below it
    assert recompute_elementwise(model, enabled=False) == 0 and elementwise_recomputed(model) == 0
    checkpoint_blocks(model, enabled=False)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_unknown_mlp_is_refused_by_name():
    model = tiny_llama()

    class SquaredReluMLP(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x) ** 2

    for block in model.model.layers:
        block.mlp = SquaredReluMLP()
    with pytest.raises(TypeError, match="SquaredReluMLP.*train.recompute_elementwise=false"):
        recompute_elementwise(model)


def test_trainer_option_trains_the_same_weights(tmp_path):
    runs = {}
    for on in (False, True):
        method = build("lora", "llama")
        cfg = TrainConfig(batch_size=4, max_steps=3, log_every=1, seed=0, recompute_elementwise=on)
        torch.manual_seed(0)
        trainer = Trainer(method, toy_examples(12, 0, 4), toy_examples(4, 1, 4), cfg, tmp_path / str(on), pad_id=1,
                          lr=1e-2)
        assert elementwise_recomputed(method.model) == (2 if on else 0)
        state = trainer.fit()
        runs[on] = ([loss for _, loss in state.loss_curve], {k: p.detach().clone() for k, p in trainer.params.items()})
    assert runs[True][0] == runs[False][0] and len(runs[False][0]) == 3
    for key, value in runs[False][1].items():
        assert torch.equal(runs[True][1][key], value), key

