"""Bottleneck adapters (houlsby, pfeiffer, parallel, scaled-parallel) on tiny GPT-2 and tiny Llama: parameter
counts, identity at init, training, save/load, cached generation, and block outputs against the formulas."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import MODEL_FACTORIES, VOCAB, tiny_gpt2
from safetensors.torch import load_file, save_file
from torch import nn

import peftlab.methods.adapters  # noqa: F401  registers the four adapter methods
from peftlab.config import ConfigError
from peftlab.evaluation.generate import greedy_generate
from peftlab.interop.adapter_files import load_adapter
from peftlab.methods import PeftMethod, get_method
from peftlab.methods.adapters import AdaptedSublayer, AdapterMethod
from peftlab.methods.io import save_adapter
from peftlab.models import arch

D, LAYERS = 32, 2
METHODS = ("adapter-houlsby", "adapter-pfeiffer", "adapter-parallel", "adapter-scaled-parallel")
# case -> (method, options, adapted sub-layers per block, bottleneck width b on the tiny models)
CASES: dict[str, tuple[str, dict[str, Any], tuple[str, ...], int]] = {
    "houlsby": ("adapter-houlsby", {"bottleneck_size": 8}, ("attn", "ffn"), 8),
    "pfeiffer-reduction": ("adapter-pfeiffer", {"reduction_factor": 4}, ("ffn",), D // 4),
    "parallel-gelu": ("adapter-parallel", {"bottleneck_size": 6, "non_linearity": "gelu"}, ("ffn",), 6),
    "parallel-both-dropout": ("adapter-parallel", {"bottleneck_size": 4, "placement": "both", "dropout": 0.1},
                              ("attn", "ffn"), 4),
    "scaled-parallel-attn": ("adapter-scaled-parallel", {"bottleneck_size": 8, "placement": "attn",
                                                         "non_linearity": "tanh"}, ("attn",), 8),
}
ACT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu,
                                                          "tanh": torch.tanh}


pytestmark = pytest.mark.usefixtures("one_thread")


def build(method: str, options: dict[str, Any], model: nn.Module) -> AdapterMethod:
    """Apply a method through the registry, as the runner does."""
    spec = get_method(method)
    return spec.apply(model, spec.build_config(options))


def build_case(case: str, model: nn.Module) -> AdapterMethod:
    method, options, _, _ = CASES[case]
    return build(method, options, model)


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def loss(model: nn.Module, method: PeftMethod, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**method.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"])).loss


def train(model: nn.Module, method: PeftMethod, batch: dict[str, torch.Tensor], steps: int) -> None:
    opt = torch.optim.AdamW(method.trainable_parameters().values(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss(model, method, batch).backward()
        opt.step()
    model.eval()


def randomize(method: PeftMethod, seed: int = 5) -> None:
    """Nonzero weights everywhere (up included), so every adapter changes its sub-layer's output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters().values():
            p.normal_(0, 0.3)


@pytest.mark.parametrize("case", CASES)
def test_only_the_adapters_train_and_the_count_matches_the_formula(case, tiny_model):
    _, _, sublayers, b = CASES[case]
    method = build_case(case, tiny_model)
    trainable = method.trainable_parameters()
    per_adapter = 2 * D * b + b + D  # down (b, d) + (b,), up (d, b) + (d,)
    assert sum(p.numel() for p in trainable.values()) == LAYERS * len(sublayers) * per_adapter
    assert {id(p) for p in tiny_model.parameters() if p.requires_grad} == {id(p) for p in trainable.values()}
    assert set(trainable) <= {name for name, _ in tiny_model.named_parameters()}
    wrapped = sorted(name for kind in sublayers for name in arch.sublayer_names(tiny_model, kind))
    assert sorted(method.layers) == wrapped
    assert all(isinstance(tiny_model.get_submodule(name), AdaptedSublayer) for name in wrapped)
    assert method.describe()["bottleneck_size"] == b and method.describe()["n_adapters"] == LAYERS * len(sublayers)
    assert not method.mergeable


def test_trainable_keys_and_sublayer_names():
    model = tiny_gpt2()
    assert arch.sublayer_names(model, "attn") == ["transformer.h.0.attn", "transformer.h.1.attn"]
    method = build_case("houlsby", model)
    assert list(method.trainable_parameters())[:5] == [
        "transformer.h.0.attn.adapter.down.weight", "transformer.h.0.attn.adapter.down.bias",
        "transformer.h.0.attn.adapter.up.weight", "transformer.h.0.attn.adapter.up.bias",
        "transformer.h.0.mlp.adapter.down.weight"]
    assert arch.family(model) == "gpt2"  # the wrappers still expose the wrapped module's layout
    assert model.transformer.h[0].attn.layer_idx == 0
    with pytest.raises(ValueError, match="already applied"):
        build_case("houlsby", model)
    llama = MODEL_FACTORIES["llama"]()
    assert arch.sublayer_names(llama, "ffn") == ["model.layers.0.mlp", "model.layers.1.mlp"]
    with pytest.raises(ValueError, match="unknown sub-layer 'mlp'"):
        arch.sublayer_names(llama, "mlp")


@pytest.mark.parametrize("case", CASES)
def test_output_at_init_equals_base(case, tiny_model, batch):
    base = logits(MODEL_FACTORIES[tiny_model.config.model_type](), batch)
    method = build_case(case, tiny_model)
    assert all(not p.any() for name, p in method.trainable_parameters().items() if ".up." in name)
    assert any(p.any() for name, p in method.trainable_parameters().items() if ".down.weight" in name)
    assert torch.equal(logits(tiny_model, batch), base)


@pytest.mark.parametrize("case", CASES)
def test_training_lowers_the_loss(case, tiny_model, batch):
    method = build_case(case, tiny_model)
    frozen = {k: v.clone() for k, v in tiny_model.state_dict().items() if ".adapter." not in k}
    with torch.no_grad():
        start = loss(tiny_model, method, batch).item()
    train(tiny_model, method, batch, steps=10)
    with torch.no_grad():
        end = loss(tiny_model, method, batch).item()
    assert end < start - 1e-3, (start, end)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in frozen.items())


@pytest.mark.parametrize("case", CASES)
def test_save_load_gives_identical_logits(case, tiny_model, batch, tmp_path):
    method = build_case(case, tiny_model)
    train(tiny_model, method, batch, steps=3)
    trained = logits(tiny_model, batch)
    save_file(method.adapter_state_dict(), tmp_path / "adapter.safetensors")

    fresh = MODEL_FACTORIES[tiny_model.config.model_type]()
    torch.manual_seed(123)  # a different down-projection init that loading must overwrite
    loaded = build_case(case, fresh)
    assert not torch.equal(logits(fresh, batch), trained)
    loaded.load_adapter_state_dict(load_file(tmp_path / "adapter.safetensors"))
    assert torch.equal(logits(fresh, batch), trained)
    assert loaded.describe() == method.describe()


@pytest.mark.parametrize("case", ["houlsby", "pfeiffer-reduction", "scaled-parallel-attn"])
def test_adapter_folder_round_trip_rebuilds_the_config(case, batch, tmp_path):
    model = tiny_gpt2()
    fingerprint = arch.arch_fingerprint(model)
    method = build_case(case, model)
    randomize(method)
    expected = logits(model, batch)
    save_adapter(method, CASES[case][0], tmp_path / "adapter", "tiny-gpt2", fingerprint)
    loaded, config = load_adapter(tiny_gpt2(), tmp_path / "adapter")
    assert config["method_config"] == dataclasses.asdict(method.config)
    assert type(loaded.config) is type(method.config)
    assert torch.equal(logits(loaded.model, batch), expected)


def reference_greedy(model: nn.Module, prompt: list[int], eos_ids: set[int], max_new: int) -> list[int]:
    """Greedy decoding by full forwards over the whole sequence at each step (no cache, no padding)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token in eos_ids:
                break
            ids.append(token)
    return ids[len(prompt):]


@pytest.mark.parametrize("case", ["houlsby", "pfeiffer-reduction", "parallel-gelu", "scaled-parallel-attn"])
def test_cached_generation_matches_full_forwards(case, tiny_model, batch):
    base = logits(tiny_model, batch)
    method = build_case(case, tiny_model)
    randomize(method)
    assert not torch.allclose(logits(tiny_model, batch), base, atol=1e-3)  # the adapters matter
    torch.manual_seed(2)
    prompts = [torch.randint(2, VOCAB, (n,)).tolist() for n in (5, 9, 3)]
    eos_ids = {1}
    got = greedy_generate(method, prompts, pad_id=1, eos_ids=eos_ids, max_new_tokens=6, device=torch.device("cpu"))
    assert got == [reference_greedy(tiny_model, p, eos_ids, 6) for p in prompts]
    assert any(len(row) > 0 for row in got)


def adapter_by_hand(method: AdapterMethod, name: str, h: torch.Tensor) -> torch.Tensor:
    """s * (act(h W_down^T + b_down) W_up^T + b_up), from the raw weights."""
    params = method.trainable_parameters()
    down = h @ params[f"{name}.adapter.down.weight"].T + params[f"{name}.adapter.down.bias"]
    up = ACT[method.config.non_linearity](down) @ params[f"{name}.adapter.up.weight"].T
    return method.config.scaling * (up + params[f"{name}.adapter.up.bias"])


def first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def capture(module: nn.Module, store: dict[str, torch.Tensor], key: str) -> list[Any]:
    """Forward hooks recording a module's hidden-state input and (first) output under ``key``."""
    def pre(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        store[f"{key}_in"] = first_input(args, kwargs).detach()

    def post(_module: nn.Module, _args: Any, output: Any) -> None:
        store[f"{key}_out"] = (output[0] if isinstance(output, tuple) else output).detach()

    return [module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]


@pytest.mark.parametrize(
    "method_name,options",
    [
        ("adapter-houlsby", {"bottleneck_size": 8}),
        ("adapter-pfeiffer", {"bottleneck_size": 8, "non_linearity": "silu"}),
        ("adapter-parallel", {"bottleneck_size": 8}),
        ("adapter-parallel", {"bottleneck_size": 8, "placement": "attn", "non_linearity": "gelu"}),
        ("adapter-scaled-parallel", {"bottleneck_size": 8, "placement": "both"}),
    ],
)
def test_block_output_matches_the_formula(method_name, options, tiny_model, batch):
    """Pre-norm block: out = x + attn'(x) + ffn'(h); sequential f' = f(u) + A(f(u)), parallel f' = f(u) + A(u)."""
    fam = tiny_model.config.model_type
    block = arch.transformer_blocks(tiny_model)[1]
    prefix = arch.module_name(tiny_model, block)
    subs = {kind: block.get_submodule(path) for kind, path in arch.SUBLAYERS[fam].items()}  # the base modules
    method = build(method_name, options, tiny_model)
    randomize(method)
    store: dict[str, torch.Tensor] = {}
    handles = capture(block, store, "block") + [h for kind, m in subs.items() for h in capture(m, store, kind)]
    logits(tiny_model, batch)
    for handle in handles:
        handle.remove()

    expected = store["block_in"].clone()
    for kind in ("attn", "ffn"):
        name = f"{prefix}.{arch.SUBLAYERS[fam][kind]}"
        out = store[f"{kind}_out"]
        if name in method.layers:
            out = out + adapter_by_hand(method, name, store[f"{kind}_in" if method.config.PARALLEL else f"{kind}_out"])
        expected = expected + out
    assert len(method.layers) == LAYERS * len(method.config.sublayers)
    torch.testing.assert_close(store["block_out"], expected, atol=1e-5, rtol=1e-5)
    # The adapters changed the block: without them the output would be x + attn(u) + ffn(h).
    plain = store["block_in"] + store["attn_out"] + store["ffn_out"]
    assert not torch.allclose(store["block_out"], plain, atol=1e-3)


@pytest.mark.parametrize("method_name", METHODS)
def test_defaults(method_name):
    spec = get_method(method_name)
    config = spec.build_config({})
    assert spec.default_lr == 1e-3
    assert (config.bottleneck_size, config.reduction_factor, config.non_linearity, config.dropout) == (
        64, None, "relu", 0.0)
    assert config.scaling == (4.0 if method_name == "adapter-scaled-parallel" else 1.0)
    assert config.placement == ("both" if method_name == "adapter-houlsby" else "ffn")
    assert config.PARALLEL == method_name.endswith("parallel")
    method = spec.apply(tiny_gpt2(), config)
    assert method.describe()["bottleneck_size"] == 64


def test_half_precision_base_keeps_float32_adapters(tiny_model, batch):
    tiny_model.to(torch.bfloat16)
    method = build_case("houlsby", tiny_model)
    assert all(p.dtype == torch.float32 for p in method.trainable_parameters().values())
    out = tiny_model(**method.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"]))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in method.trainable_parameters().values())


@pytest.mark.parametrize(
    "method,options,key,fragment",
    [
        ("adapter-parallel", {"bottleneck_size": 8, "reduction_factor": 4}, "method.reduction_factor", "not both"),
        ("adapter-houlsby", {"bottleneck_size": 0}, "method.bottleneck_size", "integer > 0"),
        ("adapter-pfeiffer", {"bottleneck_size": -4}, "method.bottleneck_size", "integer > 0"),
        ("adapter-parallel", {"bottleneck_size": 2.5}, "method.bottleneck_size", "expected an integer"),
        ("adapter-parallel", {"reduction_factor": 0}, "method.reduction_factor", "> 0"),
        ("adapter-houlsby", {"non_linearity": "swish"}, "method.non_linearity", "'relu', 'gelu', 'silu', 'tanh'"),
        ("adapter-parallel", {"placement": "mlp"}, "method.placement", "'ffn', 'attn', 'both'"),
        ("adapter-scaled-parallel", {"placement": "all"}, "method.placement", "'ffn', 'attn', 'both'"),
        ("adapter-houlsby", {"placement": "ffn"}, "method.placement", "not one of 'both' for adapter-houlsby"),
        ("adapter-pfeiffer", {"placement": "attn"}, "method.placement", "not one of 'ffn' for adapter-pfeiffer"),
        ("adapter-parallel", {"scaling": 0}, "method.scaling", "> 0"),
        ("adapter-parallel", {"dropout": 1.0}, "method.dropout", "[0, 1)"),
        ("adapter-parallel", {"bottleneck": 8}, "method.bottleneck", "valid: method.bottleneck_size"),
    ],
)
def test_bad_options_raise_config_error_naming_the_key(method, options, key, fragment):
    with pytest.raises(ConfigError) as info:
        get_method(method).build_config(options)
    assert key in str(info.value) and fragment in str(info.value)


def test_reduction_factor_larger_than_the_width_fails_at_apply():
    config = get_method("adapter-pfeiffer").build_config({"reduction_factor": 64})
    with pytest.raises(ConfigError, match=r"method.reduction_factor: hidden_size 32 // 64.0 = 0"):
        get_method("adapter-pfeiffer").apply(tiny_gpt2(), config)
