"""Method x behaviour matrix and reference parity for ia3, bitfit, last-blocks and lora with DoRA.

Tiny GPT-2 and Llama from conftest (d = 32, 2 blocks). Parity: PEFT's IA3 and DoRA (same vectors / A, B, m -> same
logits), a direct formula for what PEFT cannot express (IA3 on GPT-2 k/v slices of the fused c_attn).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

import peftlab.methods.bitfit  # noqa: F401  (registers the methods until the lead imports them in methods/__init__)
import peftlab.methods.ia3  # noqa: F401
import peftlab.methods.last_blocks  # noqa: F401
from peftlab.config import ConfigError
from peftlab.methods import PeftMethod, get_method
from peftlab.methods.ia3 import IA3Linear
from peftlab.methods.lora import LoraLinear
from peftlab.models import arch

peft = pytest.importorskip("peft")

D, LAYERS = 32, 2
PEFT_PREFIX = "base_model.model."
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",  # peft 0.21 on transformers 5
        "ignore:fan_in_fan_out is set to:UserWarning",  # PEFT on GPT-2's Conv1D
    ),
    pytest.mark.usefixtures("one_thread"),
]


def gpt2_with_biases() -> nn.Module:
    """Tiny GPT-2 whose biases and LayerNorm gains are random: GPT-2's init zeroes biases, which would hide any
    bias handling (IA3 merging b[s:e] *= l, DoRA subtracting b from the base output)."""
    model = tiny_gpt2()
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or (name.endswith(".weight") and p.dim() == 1):
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


MODEL_FACTORIES = {"gpt2": gpt2_with_biases, "llama": tiny_llama}
# (d_in, d_out) of each canonical layer; Llama k/v are narrower (2 KV heads x 8 dims).
DIMS = {
    "gpt2": {"q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D), "up": (D, 4 * D), "down": (4 * D, D),
             "c_attn": (D, 3 * D)},
    "llama": {"q": (D, D), "k": (D, 16), "v": (D, 16), "o": (D, D), "gate": (D, 64), "up": (D, 64),
              "down": (64, D)},
}
# One block's parameters: GPT-2 2 LayerNorms (2d each) + c_attn, c_proj, c_fc, mlp.c_proj with biases = 12 d^2 + 13 d;
# Llama 2 RMSNorms (d each) + q, k, v, o, gate, up, down without biases.
BLOCK = {"gpt2": 12 * D * D + 13 * D, "llama": 2 * D + D * D + 2 * D * 16 + D * D + 3 * D * 64}
FINAL_NORM = {"gpt2": 2 * D, "llama": D}

# case -> (method, options (a dict value is per family), families, expected trainable count per family)
CASES: dict[str, tuple[str, dict[str, Any], tuple[str, ...], dict[str, int]]] = {
    "ia3-default": ("ia3", {}, ("gpt2", "llama"),
                    {"gpt2": LAYERS * (D + D + 4 * D), "llama": LAYERS * (16 + 16 + 64)}),
    "ia3-whole": ("ia3", {"target_modules": {"gpt2": ["c_attn", "mlp.c_proj"], "llama": ["k_proj", "v_proj",
                                                                                            "down_proj"]},
                          "feedforward_modules": {"gpt2": ["mlp.c_proj"], "llama": ["down_proj"]}},
                  ("gpt2", "llama"), {"gpt2": LAYERS * (3 * D + 4 * D), "llama": LAYERS * (16 + 16 + 64)}),
    "ia3-q-o-up-input": ("ia3", {"target_modules": ["q", "o", "up"], "feedforward_modules": ["up"]},
                         ("gpt2", "llama"), {"gpt2": LAYERS * 3 * D, "llama": LAYERS * 3 * D}),
    "dora-qv": ("lora", {"r": 4, "use_dora": True}, ("gpt2", "llama"), {}),
    "dora-whole": ("lora", {"r": 2, "use_dora": True,
                            "target_modules": {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}},
                   ("gpt2", "llama"), {}),
    "dora-all-linear-dropout": ("lora", {"r": 2, "use_dora": True, "target_modules": "all-linear", "dropout": 0.1},
                                ("gpt2", "llama"), {}),
    "bitfit-all": ("bitfit", {}, ("gpt2",), {"gpt2": LAYERS * 11 * D + D}),
    "bitfit-attention": ("bitfit", {"biases": "attention"}, ("gpt2",), {"gpt2": LAYERS * (3 * D + D)}),
    "bitfit-mlp": ("bitfit", {"biases": "mlp"}, ("gpt2",), {"gpt2": LAYERS * (4 * D + D)}),
    "last-blocks-default": ("last-blocks", {}, ("gpt2", "llama"),
                            {f: 2 * BLOCK[f] + FINAL_NORM[f] for f in BLOCK}),
    "last-blocks-1-untied": ("last-blocks", {"n_blocks": 1, "final_norm": False, "head": "untied"},
                             ("gpt2", "llama"), {f: BLOCK[f] + VOCAB * D for f in BLOCK}),
    "last-blocks-1-tied": ("last-blocks", {"n_blocks": 1, "head": "tied"}, ("gpt2", "llama"),
                           {f: BLOCK[f] + FINAL_NORM[f] + VOCAB * D for f in BLOCK}),
}
# DoRA layers per block for the count: LoRA's r (d_in + d_out) plus one magnitude per output feature.
DORA_LAYERS = {"dora-qv": {"gpt2": ["q", "v"], "llama": ["q", "v"]},
               "dora-whole": {"gpt2": ["c_attn"], "llama": ["q", "v"]},
               "dora-all-linear-dropout": {"gpt2": ["c_attn", "o", "up", "down"], "llama": list(DIMS["llama"])}}
MATRIX = [(case, fam) for case, (_, _, families, _) in CASES.items() for fam in families]
TRAIN_LR = {"ia3": 3e-2, "lora": 1e-2, "bitfit": 1e-2, "last-blocks": 1e-3}
EMBEDDING_TRAINS = {"last-blocks-1-tied"}



def build(case: str, model: nn.Module) -> PeftMethod:
    """Apply ``case`` to ``model`` through the registry, as the runner does."""
    name, options, _, _ = CASES[case]
    fam = model.config.model_type
    spec = get_method(name)
    return spec.apply(model, spec.build_config({k: v[fam] if isinstance(v, dict) else v for k, v in options.items()}))


def expected_trainable(case: str, fam: str) -> int:
    if case in DORA_LAYERS:
        r = CASES[case][1]["r"]
        return LAYERS * sum(r * sum(DIMS[fam][t]) + DIMS[fam][t][1] for t in DORA_LAYERS[case][fam])
    return CASES[case][3][fam]


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def train(model: nn.Module, method: PeftMethod, batch: dict[str, torch.Tensor], steps: int, lr: float) -> list[float]:
    opt = torch.optim.AdamW(list(method.trainable_parameters().values()), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def randomize(named: Iterable[tuple[str, torch.Tensor]], seed: int = 5) -> None:
    """Move IA3 / LoRA / DoRA tensors (ours or PEFT's, by name) off their init; scales stay in [0.5, 1.5]."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in named:  # test code may match names; the library never does
            if "ia3_l" in name or "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
            elif "lora_" in name:
                p.normal_(0, 0.2)


@pytest.mark.parametrize("case,fam", MATRIX)
def test_only_intended_parameters_train(case, fam):
    model = MODEL_FACTORIES[fam]()
    method = build(case, model)
    trainable = method.trainable_parameters()
    assert sum(p.numel() for p in trainable.values()) == expected_trainable(case, fam)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trainable.values()}
    assert len(trainable) == len({id(p) for p in trainable.values()})  # no parameter under two keys
    assert arch.input_embeddings(model).weight.requires_grad == (case in EMBEDDING_TRAINS)


@pytest.mark.parametrize("case,fam", MATRIX)
def test_output_at_init_equals_base(case, fam, batch):
    model = MODEL_FACTORIES[fam]()
    build(case, model)
    assert torch.equal(logits(model, batch), logits(MODEL_FACTORIES[fam](), batch))


@pytest.mark.parametrize("case,fam", MATRIX)
def test_training_lowers_the_loss(case, fam, batch):
    model = MODEL_FACTORIES[fam]()
    method = build(case, model)
    emb_before = arch.input_embeddings(model).weight.detach().clone()
    losses = train(model, method, batch, steps=10, lr=TRAIN_LR[CASES[case][0]])
    with torch.no_grad():
        end = model(**batch).loss.item()
    assert end < losses[0] - 1e-3, (losses[0], end)
    assert (not torch.equal(arch.input_embeddings(model).weight, emb_before)) == (case in EMBEDDING_TRAINS)


@pytest.mark.parametrize("case,fam", MATRIX)
def test_save_load_gives_identical_logits(case, fam, batch, tmp_path):
    model = MODEL_FACTORIES[fam]()
    method = build(case, model)
    train(model, method, batch, steps=3, lr=TRAIN_LR[CASES[case][0]])
    trained = logits(model, batch)
    save_file(method.adapter_state_dict(), tmp_path / "adapter.safetensors")

    fresh = MODEL_FACTORIES[fam]()
    loaded = build(case, fresh)
    assert not torch.equal(logits(fresh, batch), trained)
    loaded.load_adapter_state_dict(load_file(tmp_path / "adapter.safetensors"))
    assert torch.equal(logits(fresh, batch), trained)
    assert loaded.describe() == method.describe()


MERGEABLE = [(c, f) for c, f in MATRIX if c.startswith(("ia3", "dora"))]


@pytest.mark.parametrize("case,fam", MERGEABLE)
def test_merge_equals_unmerged_and_unmerge_restores(case, fam, batch):
    model = MODEL_FACTORIES[fam]()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    method = build(case, model)
    randomize(method.trainable_parameters().items())
    unmerged = logits(model, batch)
    assert not torch.allclose(unmerged, logits(MODEL_FACTORIES[fam](), batch), atol=1e-3)
    assert method.mergeable
    method.merge()
    assert all(layer.merged for layer in method.layers.values())
    torch.testing.assert_close(logits(model, batch), unmerged, atol=1e-5, rtol=0)
    method.unmerge()
    for name, layer in method.layers.items():
        torch.testing.assert_close(layer.base_layer.weight, base_state[f"{name}.weight"], atol=1e-6, rtol=1e-6)
        if layer.base_layer.bias is not None:
            torch.testing.assert_close(layer.base_layer.bias, base_state[f"{name}.bias"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(model, batch), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["ia3-default", "dora-qv"])
@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_half_precision_base_keeps_float32_trainable_weights(case, fam, batch):
    model = MODEL_FACTORIES[fam]().to(torch.bfloat16)
    method = build(case, model)
    assert all(p.dtype == torch.float32 for p in method.trainable_parameters().values())
    out = model(**batch)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in method.trainable_parameters().values())


def test_ia3_merge_warns_when_a_scale_is_zero():
    method = build("ia3-default", gpt2_with_biases())
    with torch.no_grad():
        method.layers["transformer.h.0.attn.c_attn"].ia3_l["k"][3] = 0.0
    with pytest.warns(UserWarning, match="IA3 scale is exactly 0"):
        method.merge()


# ---------------------------------------------------------------------------------------------------- IA3 specifics


def test_ia3_default_rescales_kv_outputs_and_the_ffn_activation():
    method = build("ia3-default", gpt2_with_biases())
    assert method.describe() == {"output": ["c_attn[k,v]"], "input": ["c_proj"], "n_modules": 4}
    keys = list(method.trainable_parameters())
    assert keys[:3] == ["transformer.h.0.attn.c_attn.ia3_l.k", "transformer.h.0.attn.c_attn.ia3_l.v",
                        "transformer.h.0.mlp.c_proj.ia3_l"]
    assert method.model.transformer.h[0].attn.c_proj.__class__ is not IA3Linear  # attention output untouched
    llama = build("ia3-default", tiny_llama())
    shapes = {k.split(".")[-2]: tuple(p.shape) for k, p in llama.trainable_parameters().items()}
    assert shapes == {"k_proj": (16, 1), "v_proj": (16, 1), "down_proj": (1, 64)}  # PEFT's ia3_l shapes
    no_ffn = get_method("ia3").apply(tiny_llama(), get_method("ia3").build_config({"target_modules": ["q", "v"]}))
    assert no_ffn.describe()["input"] == []  # feedforward_modules=null: down only when it is targeted


def test_ia3_gpt2_kv_slices_follow_the_direct_formula():
    """y[:, d:2d] = l_k * (x W + b)[:, d:2d], y[:, 2d:] = l_v * (...), q columns untouched."""
    method = build("ia3-default", gpt2_with_biases())
    randomize(method.trainable_parameters().items())
    layer: IA3Linear = method.layers["transformer.h.0.attn.c_attn"]
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        out, base = layer(x), layer.base_layer(x)
        expected = torch.cat([base[..., :D], base[..., D:2 * D] * layer.ia3_l["k"].flatten(),
                              base[..., 2 * D:] * layer.ia3_l["v"].flatten()], dim=-1)
    assert torch.equal(out[..., :D], base[..., :D])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    ffn: IA3Linear = method.layers["transformer.h.0.mlp.c_proj"]
    h = torch.randn(2, 5, 4 * D)
    with torch.no_grad():
        torch.testing.assert_close(ffn(h), h * ffn.ia3_l["weight"].flatten() @ ffn.base_layer.weight
                                   + ffn.base_layer.bias, atol=1e-5, rtol=0)


def peft_model(fam: str, config: Any) -> nn.Module:
    return peft.get_peft_model(MODEL_FACTORIES[fam](), config).eval()


def peft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's adapter file contents, keys relative to the base model."""
    return {k.removeprefix(PEFT_PREFIX): v for k, v in peft.get_peft_model_state_dict(model).items()}


def compare(reference: torch.Tensor, got: torch.Tensor, base: torch.Tensor) -> None:
    assert not torch.allclose(reference, base, atol=1e-3)  # the adapter does change the output
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fam,case,peft_kwargs", [
    ("llama", "ia3-default", {}),  # PEFT's llama defaults: k_proj, v_proj, down_proj (feedforward)
    ("gpt2", "ia3-whole", {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]}),
])
def test_ia3_matches_peft(fam, case, peft_kwargs, batch):
    reference = peft_model(fam, peft.IA3Config(task_type="CAUSAL_LM", **peft_kwargs))
    randomize(reference.named_parameters(), seed=3)
    model = MODEL_FACTORIES[fam]()
    method = build(case, model)
    method.load_adapter_state_dict(peft_state(reference))  # PEFT's file loads as is: same keys and shapes
    compare(logits(reference, batch), logits(model, batch), logits(MODEL_FACTORIES[fam](), batch))


def test_ia3_gpt2_kv_slices_match_peft_whole_c_attn_with_ones_on_q(batch):
    model = gpt2_with_biases()
    method = build("ia3-default", model)
    randomize(method.trainable_parameters().items())
    reference = peft_model("gpt2", peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                                  feedforward_modules=["mlp.c_proj"]))
    state = method.adapter_state_dict()
    converted = {}
    for i in range(LAYERS):
        attn, mlp = f"transformer.h.{i}.attn.c_attn", f"transformer.h.{i}.mlp.c_proj"
        converted[f"{PEFT_PREFIX}{attn}.ia3_l"] = torch.cat([torch.ones(D, 1), state[f"{attn}.ia3_l.k"],
                                                             state[f"{attn}.ia3_l.v"]])
        converted[f"{PEFT_PREFIX}{mlp}.ia3_l"] = state[f"{mlp}.ia3_l"]
    assert not peft.set_peft_model_state_dict(reference, converted).unexpected_keys
    compare(logits(reference, batch), logits(model, batch), logits(gpt2_with_biases(), batch))


@pytest.mark.parametrize("targets,feedforward,message", [
    (["k", "v"], ["down"], "not among method.target_modules"),
    (["k", "v"], ["k"], "output slices"),
    (["k", "v"], ["c_attn"], "output slices"),
    (["k", "v"], ["nope"], "'nope' matches no linear layer"),
])
def test_ia3_bad_feedforward_modules_raise(targets, feedforward, message):
    spec = get_method("ia3")
    config = spec.build_config({"target_modules": targets, "feedforward_modules": feedforward})
    with pytest.raises(ConfigError, match="^method.feedforward_modules: .*" + message):
        spec.apply(gpt2_with_biases(), config)


# --------------------------------------------------------------------------------------------------- DoRA specifics


def peft_dora(fam: str, **lora_kwargs: Any) -> nn.Module:
    reference = peft_model(fam, peft.LoraConfig(use_dora=True, lora_dropout=0.0, **lora_kwargs))
    randomize(reference.named_parameters(), seed=3)
    return reference


def test_dora_magnitude_starts_at_the_output_feature_norms():
    method = build("dora-whole", gpt2_with_biases())
    layer = method.layers["transformer.h.0.attn.c_attn"]
    w = layer.base_layer.weight  # Conv1D (in, out): one output feature per column
    torch.testing.assert_close(layer.lora_magnitude_vector["weight"], w.norm(dim=0), atol=1e-6, rtol=0)
    sliced = build("dora-qv", gpt2_with_biases()).layers["transformer.h.0.attn.c_attn"]
    torch.testing.assert_close(sliced.lora_magnitude_vector["v"], w[:, 2 * D:].norm(dim=0), atol=1e-6, rtol=0)
    llama = build("dora-qv", tiny_llama()).layers["model.layers.0.self_attn.v_proj"]
    torch.testing.assert_close(llama.lora_magnitude_vector["weight"], llama.base_layer.weight.norm(dim=1))


def test_dora_llama_q_v_matches_peft_logits_and_gradients(batch):
    reference = peft_dora("llama", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = tiny_llama()
    spec = get_method("lora")
    method = spec.apply(model, spec.build_config({"r": 4, "alpha": 8, "target_modules": ["q", "v"],
                                                  "use_dora": True}))
    method.load_adapter_state_dict(peft_state(reference))
    compare(logits(reference, batch), logits(model, batch), logits(tiny_llama(), batch))
    reference(**batch).loss.backward()
    model(**batch).loss.backward()
    peft_params = dict(reference.named_parameters())
    for key, p in method.trainable_parameters().items():
        # ours: lora_A.weight, lora_magnitude_vector; PEFT: lora_A.default.weight, lora_magnitude_vector.default.weight
        peft_key = PEFT_PREFIX + (key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
                                  .replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight"))
        torch.testing.assert_close(p.grad, peft_params[peft_key].grad, atol=1e-5, rtol=1e-4)  # norm detached alike


def test_dora_gpt2_whole_c_attn_matches_peft_fan_in_fan_out(batch):
    reference = peft_dora("gpt2", r=2, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True)
    model = gpt2_with_biases()
    method = build("dora-whole", model)
    assert method.config.alpha == 16
    method.load_adapter_state_dict(peft_state(reference))
    expected = logits(reference, batch)
    compare(expected, logits(model, batch), logits(gpt2_with_biases(), batch))
    method.merge()  # folding into Conv1D's (in, out) weight scales columns
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)


def test_dora_gpt2_q_v_slices_match_peft_block_dora(batch):
    """q/v slices = a PEFT c_attn DoRA of rank 2r, block-diagonal B, and PEFT's own init magnitude on k (factor 1)."""
    r, alpha = 4, 16.0
    model = gpt2_with_biases()
    method = build("dora-qv", model)
    randomize(method.trainable_parameters().items())
    state = method.adapter_state_dict()
    reference = peft_model("gpt2", peft.LoraConfig(r=2 * r, lora_alpha=2 * alpha, target_modules=["c_attn"],
                                                   fan_in_fan_out=True, use_dora=True))
    start = peft_state(reference)
    converted = {}
    for i in range(LAYERS):
        name = f"transformer.h.{i}.attn.c_attn"
        b = torch.zeros(3 * D, 2 * r)
        b[:D, :r], b[2 * D:, r:] = state[f"{name}.lora_B.q"], state[f"{name}.lora_B.v"]
        magnitude = start[f"{name}.lora_magnitude_vector"].clone()
        magnitude[:D], magnitude[2 * D:] = state[f"{name}.lora_magnitude_vector.q"], state[
            f"{name}.lora_magnitude_vector.v"]
        converted[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.cat([state[f"{name}.lora_A.q"],
                                                                     state[f"{name}.lora_A.v"]])
        converted[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
        converted[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = magnitude
    assert not peft.set_peft_model_state_dict(reference, converted).unexpected_keys
    compare(logits(reference, batch), logits(model, batch), logits(gpt2_with_biases(), batch))


def test_dora_dropout_feeds_both_terms_like_peft():
    """Training with dropout: y = x W^T + b + (f - 1) * drop(x) W^T + f * s * drop(x) A^T B^T (PEFT's convention)."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(D, 24), {"weight": (0, 24)}, D, False, r=4, scaling=2.0, dropout=0.5, use_dora=True)
    with torch.no_grad():
        layer.lora_B["weight"].normal_(0, 0.3)
        layer.lora_magnitude_vector["weight"].mul_(torch.empty(24).uniform_(0.5, 1.5))
    w, b = layer.base_layer.weight, layer.base_layer.bias
    a, bb, m = layer.lora_A["weight"], layer.lora_B["weight"], layer.lora_magnitude_vector["weight"]
    f = m / (w + 2.0 * bb @ a).norm(dim=1)
    x = torch.randn(3, D)
    torch.manual_seed(9)
    out = layer.train()(x)
    torch.manual_seed(9)
    dropped = F.dropout(x, 0.5, training=True)
    with torch.no_grad():
        expected = x @ w.T + b + (f - 1) * (dropped @ w.T) + f * (2.0 * dropped @ a.T @ bb.T)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.eval()(x), f * (x @ (w + 2.0 * bb @ a).T) + b, atol=1e-5, rtol=0)


def test_dora_describe_and_keys():
    method = build("dora-qv", gpt2_with_biases())
    assert method.describe()["dora"] is True
    assert list(method.trainable_parameters())[:3] == ["transformer.h.0.attn.c_attn.lora_A.q",
                                                       "transformer.h.0.attn.c_attn.lora_B.q",
                                                       "transformer.h.0.attn.c_attn.lora_magnitude_vector.q"]
    whole = build("dora-whole", tiny_llama())
    assert "model.layers.0.self_attn.q_proj.lora_magnitude_vector" in whole.trainable_parameters()
    with pytest.raises(ConfigError, match="method.use_dora: expected true or false"):
        get_method("lora").build_config({"use_dora": "yes"})


# --------------------------------------------------------------------------------- BitFit and last-blocks specifics


def test_bitfit_on_llama_raises_a_clear_error():
    spec = get_method("bitfit")
    with pytest.raises(ConfigError, match="llama model has no bias parameters.*needs a model with biases, e.g. GPT-2"):
        spec.apply(tiny_llama(), spec.build_config({}))


def test_bitfit_trains_named_biases_including_norms():
    method = build("bitfit-all", gpt2_with_biases())
    names = list(method.trainable_parameters())
    assert names[:6] == [f"transformer.h.0.{m}.bias" for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2",
                                                                "mlp.c_fc", "mlp.c_proj")]
    assert names[-1] == "transformer.ln_f.bias" and len(names) == 6 * LAYERS + 1
    attention = build("bitfit-attention", gpt2_with_biases())
    assert list(attention.trainable_parameters())[:2] == ["transformer.h.0.attn.c_attn.bias",
                                                          "transformer.h.0.attn.c_proj.bias"]
    with pytest.raises(ConfigError, match="method.biases: 'norms' is not one of 'all', 'attention', 'mlp'"):
        get_method("bitfit").build_config({"biases": "norms"})


def test_last_blocks_n_blocks_out_of_range_raises(tiny_model):
    spec = get_method("last-blocks")
    with pytest.raises(ConfigError, match=r"^method.n_blocks: 3 is outside 1\.\.2; this .* model has 2"):
        spec.apply(tiny_model, spec.build_config({"n_blocks": 3}))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="method.n_blocks: (must be an integer >= 1|expected an integer, got)"):
            spec.build_config({"n_blocks": bad})
    with pytest.raises(ConfigError, match="method.head: 'shared' is not one of 'none', 'untied', 'tied'"):
        spec.build_config({"head": "shared"})


@pytest.mark.parametrize("case,head,tied_after", [
    ("last-blocks-default", "none", True), ("last-blocks-1-untied", "untied", False),
    ("last-blocks-1-tied", "tied", True),
])
def test_last_blocks_head_modes_and_describe(tiny_model, case, head, tied_after):
    method = build(case, tiny_model)
    n = CASES[case][1].get("n_blocks", 2)
    assert method.describe() == {"n_blocks": n, "first_block": LAYERS - n,
                                 "final_norm": CASES[case][1].get("final_norm", True), "head": head,
                                 "was_tied": True}
    assert arch.is_tied(tiny_model) == tied_after
    blocks = arch.transformer_blocks(tiny_model)
    assert any(p.requires_grad for p in blocks[0].parameters()) == (n == 2)
    assert all(p.requires_grad for p in blocks[-1].parameters())
