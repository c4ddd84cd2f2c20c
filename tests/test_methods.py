"""The method x behaviour matrix for lora, prompt-tuning, last-layer and full, on tiny GPT-2 and tiny Llama."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import MODEL_FACTORIES, VOCAB, tiny_gpt2
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab.config import ConfigError
from peftlab.methods import PeftMethod, get_method
from peftlab.methods.lora import LoraLinear
from peftlab.models import arch

D, LAYERS = 32, 2
# (d_in, d_out) of each canonical layer of the tiny models; Llama k/v are narrower (2 KV heads x 8 dims).
DIMS = {
    "gpt2": {"q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D), "up": (D, 4 * D), "down": (4 * D, D),
             "c_attn": (D, 3 * D)},
    "llama": {"q": (D, D), "k": (D, 16), "v": (D, 16), "o": (D, D), "gate": (D, 64), "up": (D, 64),
              "down": (64, D)},
}
# case -> (method, options, lora layers per block for the parameter-count formula); a dict value is per family.
CASES: dict[str, tuple[str, dict[str, Any], dict[str, list[str]] | None]] = {
    "lora-qv": ("lora", {"r": 4}, {"gpt2": ["q", "v"], "llama": ["q", "v"]}),
    "lora-rslora-qkvo": ("lora", {"r": 4, "alpha": 8, "rslora": True, "target_modules": ["q", "k", "v", "o"]},
                         {"gpt2": ["q", "k", "v", "o"], "llama": ["q", "k", "v", "o"]}),
    "lora-whole-modules": ("lora", {"r": 2, "target_modules": {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}},
                           {"gpt2": ["c_attn"], "llama": ["q", "v"]}),
    "lora-all-linear": ("lora", {"r": 2, "target_modules": "all-linear", "dropout": 0.1},
                        {"gpt2": ["c_attn", "o", "up", "down"], "llama": list(DIMS["llama"])}),
    "prompt-random": ("prompt-tuning", {"n_tokens": 4, "init": "random"}, None),
    "prompt-vocab": ("prompt-tuning", {"n_tokens": 5}, None),
    "prompt-text": ("prompt-tuning", {"n_tokens": 7, "init": "text", "init_token_ids": [5, 6, 7]}, None),
    "last-layer-untied": ("last-layer", {}, None),
    "last-layer-tied": ("last-layer", {"head": "tied"}, None),
    "full": ("full", {}, None),
}


pytestmark = pytest.mark.usefixtures("one_thread")


TRAIN_LR = {"lora": 1e-2, "prompt-tuning": 3e-2, "last-layer": 1e-2, "full": 1e-3}


def family_of(model: nn.Module) -> str:
    return model.config.model_type


def build(case: str, model: nn.Module) -> PeftMethod:
    """Apply ``case`` to ``model`` through the registry, as the runner does."""
    name, options, _ = CASES[case]
    options = {k: (v[family_of(model)] if isinstance(v, dict) else v) for k, v in options.items()}
    spec = get_method(name)
    return spec.apply(model, spec.build_config(options))


def logits(model: nn.Module, method: PeftMethod | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if method is not None:
        inputs = method.prepare_inputs(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        return model(**inputs).logits


def loss(model: nn.Module, method: PeftMethod, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**method.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"])).loss


def train(model: nn.Module, method: PeftMethod, batch: dict[str, torch.Tensor], steps: int) -> None:
    params = list(method.trainable_parameters().values())
    opt = torch.optim.AdamW(params, lr=TRAIN_LR[CASES_BY_METHOD[type(method).__name__]], weight_decay=0.0)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss(model, method, batch).backward()
        opt.step()
    model.eval()


CASES_BY_METHOD = {"LoraMethod": "lora", "PromptTuningMethod": "prompt-tuning", "LastLayerMethod": "last-layer",
                   "FullMethod": "full"}


def expected_trainable(case: str, model: nn.Module) -> int:
    """The parameter count each method promises, from the architecture alone."""
    name, options, lora_layers = CASES[case]
    if name == "lora":
        dims = DIMS[family_of(model)]
        return LAYERS * sum(options["r"] * (dims[t][0] + dims[t][1]) for t in lora_layers[family_of(model)])
    if name == "prompt-tuning":
        return options["n_tokens"] * D
    if name == "last-layer":
        return VOCAB * D
    return sum(p.numel() for p in model.parameters())  # full: unique parameters (tied matrix once)


@pytest.mark.parametrize("case", CASES)
def test_only_intended_parameters_train(case, tiny_model):
    expected = expected_trainable(case, tiny_model)
    method = build(case, tiny_model)
    trainable = method.trainable_parameters()
    assert sum(p.numel() for p in trainable.values()) == expected
    requiring = {id(p) for p in tiny_model.parameters() if p.requires_grad}
    assert requiring == {id(p) for p in trainable.values()}
    assert len(trainable) == len({id(p) for p in trainable.values()})  # no parameter under two keys
    emb = arch.input_embeddings(tiny_model).weight
    assert emb.requires_grad == (case in ("full", "last-layer-tied"))


def test_trainable_keys_are_stable_names():
    method = build("lora-qv", tiny_gpt2())
    keys = list(method.trainable_parameters())
    assert keys[:4] == ["transformer.h.0.attn.c_attn.lora_A.q", "transformer.h.0.attn.c_attn.lora_B.q",
                        "transformer.h.0.attn.c_attn.lora_A.v", "transformer.h.0.attn.c_attn.lora_B.v"]
    assert set(keys) <= {n for n, _ in method.model.named_parameters()}
    assert method.describe() == {"r": 4, "scaling": 4.0, "targets": ["c_attn[q,v]"], "n_modules": 2}
    with pytest.raises(ValueError, match="already applied"):
        build("lora-qv", method.model)
    whole = build("lora-whole-modules", tiny_gpt2())
    assert list(whole.trainable_parameters())[:2] == ["transformer.h.0.attn.c_attn.lora_A.weight",
                                                      "transformer.h.0.attn.c_attn.lora_B.weight"]


@pytest.mark.parametrize("case", [c for c, (m, _, _) in CASES.items() if m != "prompt-tuning"])
def test_output_at_init_equals_base(case, tiny_model, batch):
    base = logits(MODEL_FACTORIES[family_of(tiny_model)](), None, batch)
    method = build(case, tiny_model)
    assert torch.equal(logits(tiny_model, method, batch), base)


@pytest.mark.parametrize("case", CASES)
def test_training_lowers_the_loss(case, tiny_model, batch):
    method = build(case, tiny_model)
    emb_before = arch.input_embeddings(tiny_model).weight.detach().clone()
    with torch.no_grad():
        start = loss(tiny_model, method, batch).item()
    train(tiny_model, method, batch, steps=10)
    with torch.no_grad():
        end = loss(tiny_model, method, batch).item()
    assert end < start - 1e-3, (start, end)
    emb_changed = not torch.equal(arch.input_embeddings(tiny_model).weight, emb_before)
    assert emb_changed == (case in ("full", "last-layer-tied"))


@pytest.mark.parametrize("case", CASES)
def test_save_load_gives_identical_logits(case, tiny_model, batch, tmp_path):
    method = build(case, tiny_model)
    train(tiny_model, method, batch, steps=3)
    trained = logits(tiny_model, method, batch)
    save_file(method.adapter_state_dict(), tmp_path / "adapter.safetensors")

    fresh = MODEL_FACTORIES[family_of(tiny_model)]()
    torch.manual_seed(123)  # a different random init that loading must overwrite
    loaded = build(case, fresh)
    assert not torch.equal(logits(fresh, loaded, batch), trained)
    loaded.load_adapter_state_dict(load_file(tmp_path / "adapter.safetensors"))
    assert torch.equal(logits(fresh, loaded, batch), trained)
    drop = {"init_token_ids"}  # where a prompt started differs between the two inits; everything else matches
    assert {k: v for k, v in loaded.describe().items() if k not in drop} == {
        k: v for k, v in method.describe().items() if k not in drop}


def test_load_rejects_mismatched_adapters(tiny_model):
    method = build("lora-qv", tiny_model)
    state = method.adapter_state_dict()
    key = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        method.load_adapter_state_dict({k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="shape"):
        method.load_adapter_state_dict({**state, key: torch.zeros(1, 1)})


def randomize(method: PeftMethod) -> None:
    torch.manual_seed(5)
    with torch.no_grad():
        for p in method.trainable_parameters().values():
            p.normal_(0, 0.2)


@pytest.mark.parametrize("case", [c for c, (m, _, _) in CASES.items() if m == "lora"])
def test_lora_merge_equals_unmerged_and_unmerge_restores(case, tiny_model, batch):
    base_state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    method = build(case, tiny_model)
    randomize(method)
    unmerged = logits(tiny_model, method, batch)
    base = logits(MODEL_FACTORIES[family_of(tiny_model)](), None, batch)
    assert not torch.allclose(unmerged, base, atol=1e-3)
    assert method.mergeable
    method.merge()
    assert all(layer.merged for layer in method.layers.values())
    torch.testing.assert_close(logits(tiny_model, method, batch), unmerged, atol=1e-5, rtol=0)
    method.unmerge()
    for name, layer in method.layers.items():
        torch.testing.assert_close(layer.base_layer.weight, base_state[f"{name}.weight"], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(tiny_model, method, batch), unmerged, atol=1e-5, rtol=0)


def test_lora_on_tied_head_is_not_mergeable(batch):
    model = tiny_gpt2()
    spec = get_method("lora")
    method = spec.apply(model, spec.build_config({"r": 2, "target_modules": ["lm_head"]}))
    randomize(method)
    before = logits(model, method, batch)
    assert not method.mergeable
    with pytest.warns(UserWarning, match="not merged"):
        method.merge()
    assert torch.equal(logits(model, method, batch), before)


def test_lora_slices_change_only_their_columns():
    model = tiny_gpt2()
    spec = get_method("lora")
    method = spec.apply(model, spec.build_config({"r": 4, "alpha": 4, "target_modules": ["q", "v"]}))
    randomize(method)
    layer: LoraLinear = method.layers["transformer.h.0.attn.c_attn"]
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        out, base = layer(x), layer.base_layer(x)
    assert torch.equal(out[..., D:2 * D], base[..., D:2 * D])  # k columns untouched
    expected_q = base[..., :D] + x @ layer.lora_A["q"].T @ layer.lora_B["q"].T * (4 / 4)
    torch.testing.assert_close(out[..., :D], expected_q)


def test_lora_dropout_acts_on_the_lora_input_only():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(D, D), {"weight": (0, D)}, D, False, r=4, scaling=2.0, dropout=0.5).train()
    x = torch.randn(3, D)
    assert torch.equal(layer(x), layer.base_layer(x))  # B = 0: the base path is never dropped
    with torch.no_grad():
        layer.lora_B["weight"].normal_()
    no_dropout = layer.base_layer(x) + 2.0 * x @ layer.lora_A["weight"].T @ layer.lora_B["weight"].T
    assert not torch.allclose(layer(x), no_dropout)
    torch.testing.assert_close(layer.eval()(x), no_dropout)


@pytest.mark.parametrize("r,rslora,scale", [(4, False, 16 / 4), (4, True, 16 / 2), (16, True, 16 / 4)])
def test_lora_scaling(r, rslora, scale):
    config = get_method("lora").build_config({"r": r, "alpha": 16, "rslora": rslora})
    assert math.isclose(config.scaling, scale)


def test_prompt_tuning_prepare_inputs_prepends_virtual_tokens(tiny_model, batch):
    method = build("prompt-vocab", tiny_model)
    n = 5
    out = method.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert out["inputs_embeds"].shape == (3, n + 12, D)
    assert torch.equal(out["inputs_embeds"][:, :n], method.prompt.detach().expand(3, n, D))
    assert torch.equal(out["inputs_embeds"][:, n:], arch.input_embeddings(tiny_model)(batch["input_ids"]))
    assert torch.equal(out["attention_mask"][:, :n], torch.ones(3, n, dtype=batch["attention_mask"].dtype))
    assert torch.equal(out["attention_mask"][:, n:], batch["attention_mask"])
    assert (out["labels"][:, :n] == -100).all() and torch.equal(out["labels"][:, n:], batch["labels"])
    assert "labels" not in method.prepare_inputs(batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("n_tokens,expected_ids", [(7, [5, 6, 7, 5, 6, 7, 5]), (2, [5, 6])])
def test_prompt_text_init_copies_token_embeddings(tiny_model, n_tokens, expected_ids):
    spec = get_method("prompt-tuning")
    config = spec.build_config({"n_tokens": n_tokens, "init": "text", "init_text": "some words"})
    config.init_token_ids = [5, 6, 7]  # what the runner fills in from the tokenizer
    method = spec.apply(tiny_model, config)
    emb = arch.input_embeddings(tiny_model).weight
    assert torch.equal(method.prompt.detach(), emb[expected_ids])
    assert method.describe()["init_token_ids"] == expected_ids


def test_prompt_vocab_init_copies_sampled_rows_and_follows_the_seed(tiny_model):
    torch.manual_seed(7)
    method = build("prompt-vocab", tiny_model)
    ids = method.describe()["init_token_ids"]
    assert len(ids) == 5 and all(0 <= i < VOCAB for i in ids)
    assert torch.equal(method.prompt.detach(), arch.input_embeddings(tiny_model).weight[ids])
    fresh = MODEL_FACTORIES[family_of(tiny_model)]()  # the factory seeds torch itself
    torch.manual_seed(7)
    again = build("prompt-vocab", fresh)
    assert again.describe()["init_token_ids"] == ids


def test_prompt_random_init_matches_embedding_scale(tiny_model):
    method = build("prompt-random", tiny_model)
    std = arch.input_embeddings(tiny_model).weight.std().item()
    assert method.prompt.shape == (4, D) and 0.3 * std < method.prompt.std().item() < 3 * std


def test_prompt_text_without_token_ids_fails_at_apply():
    spec = get_method("prompt-tuning")
    config = spec.build_config({"init": "text", "init_text": "hello"})
    with pytest.raises(ConfigError, match="method.init_token_ids"):
        spec.apply(tiny_gpt2(), config)
    config.init_token_ids = [3, VOCAB + 4]
    with pytest.raises(ConfigError, match=r"method.init_token_ids: ids \[100\] are outside"):
        spec.apply(tiny_gpt2(), config)


@pytest.mark.parametrize("head", ["untied", "tied"])
def test_last_layer_describe_and_tying(tiny_model, head):
    method = build(f"last-layer-{head}", tiny_model)
    assert method.describe() == {"head": head, "was_tied": True}
    assert arch.is_tied(tiny_model) == (head == "tied")
    assert tiny_model.config.tie_word_embeddings == (head == "tied")
    assert list(method.trainable_parameters()) == ["lm_head.weight"]


def test_full_adapter_holds_tied_weights_once(tiny_model):
    method = build("full", tiny_model)
    state = method.adapter_state_dict()
    assert "lm_head.weight" not in state and len(state) == len(list(tiny_model.parameters()))


@pytest.mark.parametrize(
    "method,options,key,fragment",
    [
        ("lora", {"r": 0}, "method.r", "> 0"),
        ("lora", {"r": 2.5}, "method.r", "integer"),
        ("lora", {"alpha": -1}, "method.alpha", "> 0"),
        ("lora", {"dropout": 1.0}, "method.dropout", "[0, 1)"),
        ("lora", {"target_modules": []}, "method.target_modules", "non-empty"),
        ("lora", {"rank": 4}, "method.rank", "valid: method.alpha"),
        ("prompt-tuning", {"n_tokens": 0}, "method.n_tokens", "> 0"),
        ("prompt-tuning", {"init": "zeros"}, "method.init", "'random', 'vocab', 'text'"),
        ("prompt-tuning", {"init": "text"}, "method.init_text", "needs a non-empty init_text"),
        ("prompt-tuning", {"init_text": "hi"}, "method.init_text", "only used with init=text"),
        ("last-layer", {"head": "shared"}, "method.head", "'untied', 'tied'"),
        ("full", {"lr": 1.0}, "method.lr", "for method 'full'"),
    ],
)
def test_bad_options_raise_config_error_naming_the_key(method, options, key, fragment):
    with pytest.raises(ConfigError) as info:
        get_method(method).build_config(options)
    assert key in str(info.value) and fragment in str(info.value)


def test_unknown_target_module_lists_valid_names(tiny_model):
    spec = get_method("lora")
    with pytest.raises(ConfigError, match="^method.target_modules: 'qq' matches no linear layer") as info:
        spec.apply(tiny_model, spec.build_config({"target_modules": ["q", "qq"]}))
    assert ("c_attn" if family_of(tiny_model) == "gpt2" else "q_proj") in str(info.value)


@pytest.mark.parametrize("case", ["lora-qv", "prompt-vocab"])
def test_half_precision_base_keeps_float32_trainable_weights(case, tiny_model, batch):
    tiny_model.to(torch.bfloat16)
    method = build(case, tiny_model)
    assert all(p.dtype == torch.float32 for p in method.trainable_parameters().values())
    out = tiny_model(**method.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"]))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in method.trainable_parameters().values())
