"""Architecture facts: target resolution on GPT-2 and Llama, errors, fingerprints, tied heads."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_gpt2, tiny_llama
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from peftlab.config import ConfigError
from peftlab.models import arch

D = 32  # hidden size of the tiny models


def names(targets: list[arch.TargetModule]) -> list[tuple[str, str | None, tuple[int, int] | None]]:
    return [(t.name, t.part, t.out_slice) for t in targets]


def test_gpt2_qkv_are_slices_of_fused_c_attn():
    model = tiny_gpt2()
    got = names(arch.resolve_targets(model, ["v", "q"]))
    assert got == [
        ("transformer.h.0.attn.c_attn", "q", (0, D)),
        ("transformer.h.0.attn.c_attn", "v", (2 * D, 3 * D)),
        ("transformer.h.1.attn.c_attn", "q", (0, D)),
        ("transformer.h.1.attn.c_attn", "v", (2 * D, 3 * D)),
    ]
    k = arch.resolve_targets(model, "k")[0]
    got_k = (k.out_slice, k.out_size, k.in_features, k.out_features, k.fan_in_fan_out)
    assert got_k == ((D, 2 * D), D, D, 3 * D, True)
    assert isinstance(k.module, Conv1D)


def test_gpt2_canonical_o_up_down_and_whole_c_attn():
    model = tiny_gpt2()
    got = names(arch.resolve_targets(model, ["o", "up", "down"]))
    assert got[:3] == [("transformer.h.0.attn.c_proj", None, None), ("transformer.h.0.mlp.c_fc", None, None),
                       ("transformer.h.0.mlp.c_proj", None, None)]
    whole = arch.resolve_targets(model, ["c_attn"])
    assert [(t.name, t.out_size) for t in whole] == [(f"transformer.h.{i}.attn.c_attn", 3 * D) for i in range(2)]
    # a bare suffix matches every module ending in it: attention and MLP output projections
    assert len(arch.resolve_targets(model, ["c_proj"])) == 4
    assert len(arch.resolve_targets(model, ["mlp.c_proj"])) == 2


def test_llama_canonical_names_and_gqa_shapes():
    model = tiny_llama()
    got = arch.resolve_targets(model, ["q", "k", "v", "o", "gate", "up", "down"])
    assert len(got) == 14 and all(t.part is None and not t.fan_in_fan_out for t in got)
    shapes = {t.name.split(".")[-1]: (t.in_features, t.out_size) for t in got}
    # grouped-query attention: 2 KV heads of 8 dims -> k/v project to 16
    assert shapes == {"q_proj": (D, D), "k_proj": (D, 16), "v_proj": (D, 16), "o_proj": (D, D),
                      "gate_proj": (D, 64), "up_proj": (D, 64), "down_proj": (64, D)}
    assert got[0].name == "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("family,per_block", [("gpt2", 4), ("llama", 7)])
def test_all_linear_covers_blocks_but_not_the_head(family, per_block):
    model = tiny_gpt2() if family == "gpt2" else tiny_llama()
    got = arch.resolve_targets(model, "all-linear")
    assert len(got) == 2 * per_block
    assert all(t.part is None for t in got) and not any("lm_head" in t.name for t in got)


def test_regex_string_fullmatches_module_names():
    got = arch.resolve_targets(tiny_llama(), r".*\.1\.self_attn\.(q|v)_proj")
    assert [t.name for t in got] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert [t.name for t in arch.resolve_targets(tiny_gpt2(), r".*c_attn")] == [
        "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_head_can_be_targeted_by_name():
    got = arch.resolve_targets(tiny_gpt2(), ["lm_head"])
    assert [(t.name, t.in_features, t.out_size) for t in got] == [("lm_head", D, VOCAB)]


@pytest.mark.parametrize(
    "family,targets,message",
    [
        ("gpt2", ["gate"], "'gate' matches no linear layer"),
        ("gpt2", ["q", "nope"], "'nope' matches no linear layer"),
        ("llama", ["c_attn"], "'c_attn' matches no linear layer"),
        ("llama", r"foo\d+", "fully matches no linear layer"),
        ("llama", "(unclosed", "not a valid regex"),
        ("gpt2", ["q", "c_attn"], "both whole and as q/k/v slices"),
        ("gpt2", [], "non-empty list"),
    ],
)
def test_resolve_errors_name_the_key_and_valid_choices(family, targets, message):
    model = tiny_gpt2() if family == "gpt2" else tiny_llama()
    with pytest.raises(ConfigError, match="^method.target_modules: ") as info:
        arch.resolve_targets(model, targets, key="method.target_modules")
    assert message in str(info.value)
    if "matches no" in message:
        valid = str(info.value).split("valid: ", 1)[1]
        assert ("c_attn" if family == "gpt2" else "q_proj") in valid and "all-linear" in valid
        assert ("gate" in valid) == (family == "llama")  # only canonical names this family has


def test_fingerprint_fields():
    assert arch.arch_fingerprint(tiny_gpt2()) == {
        "model_type": "gpt2", "vocab_size": VOCAB, "hidden_size": D, "num_layers": 2, "num_heads": 4,
        "num_kv_heads": 4, "intermediate_size": 4 * D, "tied": True}
    assert arch.arch_fingerprint(tiny_llama()) == {
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": D, "num_layers": 2, "num_heads": 4,
        "num_kv_heads": 2, "intermediate_size": 64, "tied": True}


def test_tied_detection_and_untie(tiny_model):
    assert arch.is_tied(tiny_model)
    before = arch.arch_fingerprint(tiny_model)
    emb = arch.input_embeddings(tiny_model).weight
    head_w = arch.untie_output_head(tiny_model)
    assert not arch.is_tied(tiny_model) and head_w is not emb and torch.equal(head_w, emb)
    assert tiny_model.config.tie_word_embeddings is False
    tiny_model.tie_weights()  # what transformers calls on load/resize: must not re-tie
    assert not arch.is_tied(tiny_model)
    assert arch.arch_fingerprint(tiny_model) == before  # still the identity of the (tied) base
    with torch.no_grad():
        head_w.add_(1.0)
    assert not torch.equal(head_w, emb)


def test_untied_base_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    assert not arch.is_tied(model) and arch.arch_fingerprint(model)["tied"] is False


def test_trunk_head_blocks_compose_to_the_model(tiny_model):
    ids = torch.randint(2, VOCAB, (2, 6))
    hidden = arch.trunk(tiny_model)(input_ids=ids).last_hidden_state  # (B, T, d), final norm applied
    assert hidden.shape == (2, 6, D)
    logits = arch.output_head(tiny_model)(hidden)
    torch.testing.assert_close(logits, tiny_model(input_ids=ids).logits)
    assert len(arch.transformer_blocks(tiny_model)) == 2
    assert isinstance(arch.input_embeddings(tiny_model), nn.Embedding)
    assert arch.output_head_name(tiny_model) == "lm_head"
