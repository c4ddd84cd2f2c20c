"""Equal-budget sizing: counts from the config equal what methods really train; the budget solver; parse_budget."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest
import torch
from conftest import MODEL_FACTORIES, requires_smollm2, tiny_gpt2, tiny_llama
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import peftlab.methods  # noqa: F401  registers every method
from peftlab.config import ConfigError, ModelConfig
from peftlab.methods import all_methods, get_method
from peftlab.methods.budget import (
    add_budget_argument,
    budget_rows,
    budget_table,
    count_trainable,
    format_budget_table,
    parse_budget,
    print_budget,
    solve,
)
from peftlab.methods.prefix_tuning.count import folded_count
from peftlab.models.arch import LINEAR_TYPES, linear_features
from peftlab.models.shape import ModelShape, model_shape, resolve_target_shapes

pytestmark = pytest.mark.usefixtures("one_thread")


_SMALL = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def _gpt2_untied() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=3, n_head=4, n_inner=40,
                                      tie_word_embeddings=False))


def _llama_biased() -> nn.Module:
    """Untied Llama with attention and MLP biases and a head_dim that is not hidden / heads."""
    return LlamaForCausalLM(LlamaConfig(**_SMALL, head_dim=12, attention_bias=True, mlp_bias=True,
                                        tie_word_embeddings=False))


# Layout checks beyond the two conftest models: every model type model_shape knows.
SHAPE_FACTORIES = {
    **MODEL_FACTORIES,
    "gpt2-untied": _gpt2_untied,
    "llama-biased": _llama_biased,
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_SMALL)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_SMALL, tie_word_embeddings=True)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**_SMALL, head_dim=8)),
}


def shape_of(model: nn.Module) -> ModelShape:
    return model_shape(model.config)


@pytest.mark.parametrize("name", sorted(SHAPE_FACTORIES))
def test_shape_from_config_matches_the_built_model(name):
    model = SHAPE_FACTORIES[name]()
    shape = shape_of(model)
    assert list(shape.params) == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    real_linears = [(n, *linear_features(m)) for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)]
    assert [(lin.name, lin.in_features, lin.out_features) for lin in shape.linears] == real_linears


def test_unknown_model_type_is_a_clear_error():
    with pytest.raises(ConfigError, match="model_type 'bert' is not one of gpt2, llama"):
        model_shape(argparse.Namespace(model_type="bert"))


# case -> (method, options); an options value that is a dict is per family ("gpt2" / "llama").
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "lora-qv": ("lora", {"r": 3}),
    "lora-all-linear": ("lora", {"r": 2, "target_modules": "all-linear"}),
    "lora-dora-qkvo": ("lora", {"r": 2, "use_dora": True, "target_modules": ["q", "k", "v", "o"]}),
    "lora-whole-modules": ("lora", {"r": 2, "target_modules": {"gpt2": ["c_attn", "lm_head"],
                                                               "llama": ["k_proj", "lm_head"]}}),
    "lora-regex": ("lora", {"r": 5, "rslora": True, "target_modules": r".*\.1\..*(c_fc|up_proj)"}),
    "prompt": ("prompt-tuning", {"n_tokens": 6}),
    "prefix-mlp": ("prefix-tuning", {"n_tokens": 5, "hidden_size": 24}),
    "prefix-direct": ("prefix-tuning", {"n_tokens": 5, "reparametrize": False}),
    "houlsby-b": ("adapter-houlsby", {"bottleneck_size": 6}),
    "pfeiffer-rf": ("adapter-pfeiffer", {"reduction_factor": 5}),
    "parallel-both": ("adapter-parallel", {"bottleneck_size": 3, "placement": "both"}),
    "scaled-parallel-rf": ("adapter-scaled-parallel", {"reduction_factor": 2.5, "placement": "attn"}),
    "ia3-default": ("ia3", {}),
    "ia3-ff-explicit": ("ia3", {"target_modules": ["q", "up", "down"], "feedforward_modules": ["up", "down"]}),
    "ia3-no-ff": ("ia3", {"target_modules": "all-linear", "feedforward_modules": []}),
    "last-layer-untied": ("last-layer", {}),
    "last-layer-tied": ("last-layer", {"head": "tied"}),
    "last-blocks-1": ("last-blocks", {"n_blocks": 1}),
    "last-blocks-all-no-norm": ("last-blocks", {"n_blocks": 2, "final_norm": False}),
    "last-blocks-head-untied": ("last-blocks", {"n_blocks": 1, "head": "untied"}),
    "last-blocks-head-tied": ("last-blocks", {"n_blocks": 1, "head": "tied"}),
    "intrinsic-all-linear": ("intrinsic-dim", {"d": 40}),
    "intrinsic-said-qv": ("intrinsic-dim", {"d": 7, "said": True, "target_modules": ["q", "v"]}),
    "full": ("full", {}),
}
GPT2_ONLY = {
    "bitfit-all": ("bitfit", {}),
    "bitfit-attention": ("bitfit", {"biases": "attention"}),
    "bitfit-mlp": ("bitfit", {"biases": "mlp"}),
    "lora-slices-and-whole": ("lora", {"r": 2, "target_modules": ["q", "v", "c_proj"]}),
}


def options_for(options: dict[str, Any], family: str) -> dict[str, Any]:
    return {k: (v[family] if isinstance(v, dict) else v) for k, v in options.items()}


def real_trainable(model: nn.Module, name: str, options: dict[str, Any]) -> tuple[int, Any]:
    """Apply the method for real; its trainable parameters must be exactly the model's requires_grad ones."""
    spec = get_method(name)
    method = spec.apply(model, spec.build_config(dict(options)))
    by_method = sum(p.numel() for p in method.trainable_parameters().values())
    assert by_method == sum(p.numel() for p in model.parameters() if p.requires_grad)
    return by_method, method


@pytest.mark.parametrize("family", sorted(MODEL_FACTORIES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_count_from_config_equals_trainable_parameters(case, family):
    name, options = CASES[case]
    options = options_for(options, family)
    model = MODEL_FACTORIES[family]()
    expected = count_trainable(name, shape_of(model), options)
    real, method = real_trainable(model, name, options)
    assert expected == real
    if name == "prefix-tuning":  # after training the MLP is folded: P (n, L * 2 * k) remains
        method.fold()
        folded = sum(p.numel() for p in method.trainable_parameters().values())
        assert folded == folded_count(shape_of(model), get_method(name).build_config(options))


@pytest.mark.parametrize("case", sorted(GPT2_ONLY))
def test_gpt2_only_counts(case):
    name, options = GPT2_ONLY[case]
    model = tiny_gpt2()
    assert count_trainable(name, shape_of(model), options) == real_trainable(model, name, options)[0]


@pytest.mark.parametrize(("factory", "name", "options"), [
    ("llama-biased", "bitfit", {"biases": "attention"}),
    ("llama-biased", "bitfit", {"biases": "mlp"}),
    ("llama-biased", "last-blocks", {"n_blocks": 2, "head": "untied"}),
    ("gpt2-untied", "last-layer", {}),
    ("gpt2-untied", "lora", {"r": 2, "target_modules": "all-linear", "use_dora": True}),
    ("qwen2", "bitfit", {}),
    ("qwen3", "last-blocks", {"n_blocks": 1}),
    ("qwen3", "ia3", {"target_modules": "all-linear"}),
    ("mistral", "prefix-tuning", {"n_tokens": 3, "hidden_size": 8}),
    ("mistral", "full", {}),
])
def test_counts_on_other_layouts(factory, name, options):
    model = SHAPE_FACTORIES[factory]()
    assert count_trainable(name, shape_of(model), options) == real_trainable(model, name, options)[0]


@pytest.mark.parametrize(("family", "name", "options", "match"), [
    ("llama", "bitfit", {}, "no bias parameters"),
    ("llama", "last-blocks", {"n_blocks": 3}, "outside 1..2"),
    ("gpt2", "lora", {"target_modules": ["gate"]}, "matches no linear layer"),
    ("gpt2", "lora", {"target_modules": ["c_attn", "q"]}, "both whole and as q/k/v slices"),
    ("llama", "lora", {"target_modules": "nothing.*here"}, "fully matches no linear layer"),
    ("gpt2", "ia3", {"target_modules": ["k", "v"], "feedforward_modules": ["down"]}, "not among"),
    ("gpt2", "ia3", {"target_modules": ["q", "v"], "feedforward_modules": ["v"]}, "output slices"),
    ("llama", "adapter-pfeiffer", {"reduction_factor": 64}, "bottleneck must be > 0"),
])
def test_count_refuses_what_apply_refuses(family, name, options, match):
    shape = shape_of(MODEL_FACTORIES[family]())
    with pytest.raises(ConfigError, match=match):
        count_trainable(name, shape, options)
    spec = get_method(name)
    with pytest.raises(ConfigError, match=match):
        spec.apply(MODEL_FACTORIES[family](), spec.build_config(options))


def test_target_shapes_follow_resolve_targets():
    shape = shape_of(tiny_gpt2())
    targets = resolve_target_shapes(shape, ["v", "q", "c_fc"])
    assert [(t.name, t.part, t.out_slice, t.out_size) for t in targets[:3]] == [
        ("transformer.h.0.attn.c_attn", "q", (0, 32), 32),
        ("transformer.h.0.attn.c_attn", "v", (64, 96), 32),
        ("transformer.h.0.mlp.c_fc", None, None, 128),
    ]


KNOBS = {"lora": "r", "prompt-tuning": "n_tokens", "prefix-tuning": "n_tokens", "adapter-houlsby": "bottleneck_size",
         "adapter-parallel": "bottleneck_size", "intrinsic-dim": "d", "last-blocks": "n_blocks"}


@pytest.mark.parametrize("family", sorted(MODEL_FACTORIES))
@pytest.mark.parametrize(("name", "options", "budget"), [
    ("lora", {"target_modules": "all-linear"}, 5_000),
    ("lora", {"use_dora": True}, 777),
    ("prompt-tuning", {}, 1_000),
    ("prefix-tuning", {"reparametrize": False}, 1_000),
    ("prefix-tuning", {"hidden_size": 4}, 1_500),
    ("adapter-houlsby", {"reduction_factor": 16}, 2_000),
    ("adapter-parallel", {"placement": "both"}, 3_333),
    ("intrinsic-dim", {"said": True}, 1_234),
    ("last-blocks", {"final_norm": False}, 15_000),
])
def test_solver_is_within_budget_and_the_next_value_exceeds_it(name, options, budget, family):
    model = MODEL_FACTORIES[family]()
    shape = shape_of(model)
    sol = solve(name, shape, budget, options)
    knob = KNOBS[name]
    assert sol.fits and sol.knob == knob and not sol.at_maximum
    assert sol.options[knob] == sol.value and "reduction_factor" not in sol.options
    assert sol.count == count_trainable(name, shape, sol.options) <= budget
    assert count_trainable(name, shape, {**sol.options, knob: sol.value + 1}) > budget
    assert real_trainable(model, name, sol.options)[0] == sol.count


def test_solver_reports_when_even_the_smallest_setting_exceeds():
    shape = shape_of(tiny_llama())
    sol = solve("prefix-tuning", shape, 100, {})  # the reparametrization MLP alone is ~ 66k parameters
    assert (sol.fits, sol.value, sol.options["n_tokens"]) == (False, 1, 1)
    assert sol.count == count_trainable("prefix-tuning", shape, {"n_tokens": 1}) > 100
    rows = {r.method: r for r in budget_rows(shape, 100, methods=["prefix-tuning"])}
    assert "smallest n_tokens exceeds the budget" in rows["prefix-tuning"].note


def test_solver_stops_at_the_knob_maximum():
    shape = shape_of(tiny_gpt2())
    sol = solve("last-blocks", shape, shape.total_params, {"head": "untied"})
    assert (sol.value, sol.fits, sol.at_maximum) == (shape.num_layers, True, True)


def test_fixed_methods_report_their_count_and_fit():
    shape = shape_of(tiny_gpt2())
    full = solve("full", shape, shape.total_params - 1)
    assert (full.count, full.fits, full.knob) == (shape.total_params, False, None)
    ia3 = solve("ia3", shape, 10**6)
    assert ia3.fits and ia3.count == 2 * (2 * 32 + 128)  # k, v slices (32 each) + down's input (128) per block


@pytest.mark.parametrize(("text", "total", "expected"), [
    ("0.1%", 1_000, 1), ("0.3%", 1_000, 3), ("0.1%", 134_515_008, 134_515), ("100%", 77, 77), ("2.5 %", 1000, 25),
    ("150000", 0, 150_000), ("150_000", 0, 150_000), ("150,000", 0, 150_000), ("1.5M", 0, 1_500_000),
    ("1.5m", 0, 1_500_000), ("2k", 0, 2_000), ("2K", 0, 2_000), ("1B", 0, 10**9), ("1e5", 0, 100_000),
    ("1.2345k", 0, 1_234), (" 12 ", 0, 12), (5, 0, 5),
])
def test_parse_budget(text, total, expected):
    assert parse_budget(text, total) == expected


@pytest.mark.parametrize(("text", "match"), [
    ("", "is not a percentage"), ("abc", "is not a percentage"), ("-5", "is not a percentage"),
    ("1.5x", "is not a percentage"), ("%", "is not a percentage"), ("0", "at least 1"), ("0%", "in \\(0, 100\\]"),
    ("150%", "in \\(0, 100\\]"), ("0.0001%", "at least 1"), (True, "expected"), (None, "expected"),
])
def test_parse_budget_errors(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_budget(text, 100)


def test_budget_rows_cover_every_method_and_route_options():
    shape = shape_of(tiny_llama())
    rows = {r.method: r for r in budget_rows(shape, 2_000, {"target_modules": ["q", "v"]})}
    assert set(rows) == {s.name for s in all_methods()}
    assert rows["bitfit"].count is None and "no bias parameters" in rows["bitfit"].note
    # q: 32 -> 32 and v: 32 -> 16 in 2 blocks: 224 per rank; 8 * 224 = 1,792 <= 2,000 < 9 * 224
    assert rows["lora"].setting == "r=8" and rows["lora"].count == 8 * 2 * (32 + 32 + 32 + 16)
    assert rows["ia3"].count == 2 * (32 + 16)  # target_modules reached IA3 too: q and v outputs
    assert rows["full"].count == shape.total_params and not rows["full"].fits
    with pytest.raises(ConfigError, match="unknown option.*method.rank"):
        budget_rows(shape, 2_000, {"rank": 4})


def test_budget_table_and_cli_on_a_local_model(tmp_path, capsys):
    tiny_gpt2().config.save_pretrained(tmp_path)  # config.json only: no weights are needed
    table = budget_table(str(tmp_path), "1%", ["method=[lora, full]", "method.target_modules=[q, v]"])
    assert [r.method for r in table.rows] == ["lora", "full"]
    assert table.budget == table.shape.total_params // 100
    text = format_budget_table(table)
    assert f"{table.shape.total_params:,} parameters" in text and "lora" in text and "r=" in text
    parser = argparse.ArgumentParser()
    add_budget_argument(parser)
    ns = parser.parse_args(["--budget", "2k", f"model={tmp_path}", "method=prompt-tuning"])
    assert print_budget(ns) == 0
    out = capsys.readouterr().out
    assert "budget 2k = 2,000" in out and "n_tokens=62" in out  # 62 * 32 = 1,984 <= 2,000 < 63 * 32
    with pytest.raises(ConfigError, match="need --budget"):
        print_budget(parser.parse_args([f"model={tmp_path}"]))
    with pytest.raises(ConfigError, match="takes model=NAME"):
        print_budget(parser.parse_args(["--budget", "2k", f"model={tmp_path}", "train.lr=1"]))


@requires_smollm2
def test_smollm2_config_shape_equals_the_model_built_on_meta():
    """The alias's config alone (the converted folder's config.json, or the GGUF metadata): its layout equals the
    real architecture's, built on the meta device (no weights read)."""
    from peftlab.models.loading import load_model_config

    config = load_model_config(ModelConfig())
    shape = model_shape(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert list(shape.params) == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert shape.total_params == 134_515_008 and shape.tied
    assert json.loads(config.to_json_string())["model_type"] == "llama"
