"""MAM adapter against the direct formula: its forward is prefix tuning applied, then the scaled parallel FFN adapter
applied, with the same weights; the FFN output is f(x) + s (relu(x W_down^T + b_down) W_up^T + b_up); the options
reach both parts; the count is the sum of the parts'; no PEFT export and no merge."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_FACTORIES

from peftlab.config import ConfigError
from peftlab.interop.adapter_files import load_adapter
from peftlab.interop.export_peft import save_peft_adapter
from peftlab.interop.peft_format import PeftFormatError
from peftlab.methods.budget import count_trainable
from peftlab.methods.io import save_adapter
from peftlab.models.arch import arch_fingerprint, sublayer_names
from peftlab.models.shape import model_shape
from peftlab.registry import get_method

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]
OPTIONS = {"n_tokens": 5, "hidden_size": 16, "bottleneck_size": 6, "scaling": 3.0}


def apply(name: str, family: str, options: dict):
    spec = get_method(name)
    return spec.apply(MODEL_FACTORIES[family](), spec.build_config(options))


def perturbed_mam(family: str, **options):
    method = apply("mam", family, {**OPTIONS, **options})
    torch.manual_seed(3)
    with torch.no_grad():
        for p in method.trainable_parameters().values():
            p.add_(0.1 * torch.randn_like(p))
    method.model.eval()
    return method


def real_logits(method) -> torch.Tensor:
    torch.manual_seed(1)
    ids = torch.randint(2, 96, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        return method.model(**method.prepare_inputs(ids, mask)).logits[mask.bool()]


@pytest.mark.parametrize("family", sorted(MODEL_FACTORIES))
def test_forward_is_prefix_tuning_then_the_scaled_parallel_adapter_with_the_same_weights(family):
    mam = perturbed_mam(family)
    prefix_part = {k.removeprefix("prefix_encoder."): v for k, v in mam.adapter_state_dict().items()
                   if k.startswith("prefix_encoder.")}
    adapter_part = {k: v for k, v in mam.adapter_state_dict().items() if not k.startswith("prefix_encoder.")}

    model = MODEL_FACTORIES[family]()
    prefix = get_method("prefix-tuning").apply(model, get_method("prefix-tuning").build_config(
        {"n_tokens": 5, "hidden_size": 16}))
    adapters = get_method("adapter-scaled-parallel").apply(model, get_method("adapter-scaled-parallel").build_config(
        {"bottleneck_size": 6, "scaling": 3.0, "placement": "ffn"}))
    prefix.load_adapter_state_dict(prefix_part)
    adapters.load_adapter_state_dict(adapter_part)
    model.eval()
    torch.testing.assert_close(real_logits(mam), real_logits(prefix), rtol=0, atol=0)

    without_adapters = MODEL_FACTORIES[family]()
    alone = get_method("prefix-tuning").apply(without_adapters, prefix.config)
    alone.load_adapter_state_dict(prefix_part)
    assert (real_logits(mam) - real_logits(alone)).abs().max() > 1e-3  # the adapters do act


@pytest.mark.parametrize("family", sorted(MODEL_FACTORIES))
def test_each_ffn_adds_s_times_the_bottleneck_of_its_input(family):
    mam = perturbed_mam(family)
    for name in sublayer_names(mam.model, "ffn"):
        wrapped = mam.model.get_submodule(name)
        a = wrapped.adapter
        x = torch.randn(2, 3, 32)
        with torch.no_grad():
            direct = wrapped.base_layer(x) + 3.0 * (torch.relu(x @ a.down.weight.T + a.down.bias) @ a.up.weight.T
                                                    + a.up.bias)
            torch.testing.assert_close(wrapped(x), direct, rtol=0, atol=1e-6)
    assert not any(type(mam.model.get_submodule(n)).__name__ == "AdaptedSublayer"
                   for n in sublayer_names(mam.model, "attn"))


def test_the_prefix_cache_holds_p_laid_out_per_layer():
    mam = perturbed_mam("llama")
    p = mam.prefix.encoder()  # (n, L * 2 * k): layer l's keys, then its values, each (kv heads, head_dim) per token
    cache = mam.prepare_inputs(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))["cache"]
    per_layer = p.view(5, 2, 2, 2, 8)  # (n, layer, key/value, kv heads, head_dim)
    for layer in range(2):
        torch.testing.assert_close(cache.layers[layer].keys[0], per_layer[:, layer, 0].transpose(0, 1))
        torch.testing.assert_close(cache.layers[layer].values[0], per_layer[:, layer, 1].transpose(0, 1))


def test_init_is_prefix_tuning_alone_and_only_both_parts_train():
    mam = apply("mam", "llama", OPTIONS)
    params = mam.trainable_parameters()
    assert {k.split(".")[0] for k in params} == {"prefix_encoder", "model"}
    assert all(".mlp.adapter." in k for k in params if not k.startswith("prefix_encoder."))
    assert {n for n, p in mam.model.named_parameters() if p.requires_grad} == set(params)
    alone = apply("prefix-tuning", "llama", {"n_tokens": 5, "hidden_size": 16})
    alone.load_adapter_state_dict({k.removeprefix("prefix_encoder."): v for k, v in mam.adapter_state_dict().items()
                                   if k.startswith("prefix_encoder.")})
    mam.model.eval()
    alone.model.eval()
    torch.testing.assert_close(real_logits(mam), real_logits(alone), rtol=0, atol=0)  # up = 0: adapters add 0


def test_options_reach_both_parts_and_the_count_is_their_sum():
    options = {"n_tokens": 7, "reparametrize": False, "bottleneck_size": 3, "scaling": 2.5, "non_linearity": "gelu"}
    mam = apply("mam", "gpt2", options)
    assert (mam.prefix.config.n_tokens, mam.prefix.config.reparametrize) == (7, False)
    assert (mam.adapters.bottleneck_size, mam.adapters.config.scaling, mam.adapters.config.non_linearity,
            mam.adapters.config.placement) == (3, 2.5, "gelu", "ffn")
    shape = model_shape(MODEL_FACTORIES["gpt2"]().config)
    parts = (count_trainable("prefix-tuning", shape, {"n_tokens": 7, "reparametrize": False})
             + count_trainable("adapter-scaled-parallel", shape, {"bottleneck_size": 3, "placement": "ffn"}))
    assert count_trainable("mam", shape, options) == parts == sum(p.numel() for p in
                                                                  mam.trainable_parameters().values())
    assert mam.describe()["adapter"]["n_adapters"] == 2 and mam.describe()["prefix"]["n_tokens"] == 7


def test_folded_after_training_it_saves_p_and_the_adapters_and_loads_back(tmp_path):
    mam = perturbed_mam("llama")
    expected = real_logits(mam)
    mam.after_training()
    assert {k for k in mam.adapter_state_dict() if k.startswith("prefix_encoder.")} == {
        "prefix_encoder.prompt_embeddings"}
    torch.testing.assert_close(real_logits(mam), expected, rtol=0, atol=1e-5)
    base = MODEL_FACTORIES["llama"]()
    folder = save_adapter(mam, "mam", tmp_path / "adapter", "tiny", arch_fingerprint(base))
    loaded, _ = load_adapter(base, folder)  # a fresh MAM with the MLP folds on loading P
    base.eval()
    torch.testing.assert_close(real_logits(loaded), expected, rtol=0, atol=1e-5)


def test_no_peft_export_and_no_merge(tmp_path):
    mam = perturbed_mam("llama")
    assert not mam.mergeable and get_method("mam").merge_rule == ""
    with pytest.raises(PeftFormatError, match="method 'mam' has no Hugging Face PEFT equivalent.*PEFT has no MAM"):
        save_peft_adapter(mam, "mam", tmp_path / "peft")


@pytest.mark.parametrize(("options", "key"), [
    ({"n_tokens": 0}, "method.n_tokens"), ({"hidden_size": -1}, "method.hidden_size"),
    ({"bottleneck_size": 0}, "method.bottleneck_size"), ({"scaling": 0}, "method.scaling"),
    ({"non_linearity": "swish"}, "method.non_linearity"), ({"dropout": 1.0}, "method.dropout"),
    ({"placement": "attn"}, "unknown option"),
])
def test_bad_options_name_the_key(options, key):
    with pytest.raises(ConfigError, match=key):
        get_method("mam").build_config(options)
