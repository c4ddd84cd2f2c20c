"""LoHa against PEFT 0.21.2 (a PEFT-made adapter imports with the same logits; PEFT's init) and the direct formula
(alpha / r) (W1a W1b) * (W2a W2b) on GPT-2's Conv1D slices, which PEFT cannot wrap."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MODEL_FACTORIES

from peftlab.interop.adapter_files import load_adapter
from peftlab.interop.peft_format import PeftFormatError
from peftlab.registry import get_method

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning",
                                                                                "ignore::FutureWarning")]


def logits(model):
    torch.manual_seed(1)
    with torch.no_grad():
        return model(input_ids=torch.randint(2, 96, (2, 7))).logits


def apply(family: str, **options):
    spec = get_method("loha")
    return spec.apply(MODEL_FACTORIES[family](), spec.build_config(options))


def test_a_peft_loha_adapter_imports_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoHaConfig(r=3, alpha=5, target_modules=["q_proj", "o_proj", "up_proj"], rank_dropout=0.1)
    reference = peft.get_peft_model(MODEL_FACTORIES["llama"](), config)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "hada_" in name:
                p.add_(0.1 * torch.randn_like(p))
    reference.eval().save_pretrained(tmp_path / "peft")
    expected = logits(reference)
    fresh = MODEL_FACTORIES["llama"]()
    imported, record = load_adapter(fresh, tmp_path / "peft")
    assert record["method"] == "loha" and imported.config.scaling == 5 / 3
    torch.testing.assert_close(logits(fresh.eval()), expected, rtol=0, atol=1e-5)
    assert (expected - logits(MODEL_FACTORIES["llama"]())).abs().max() > 1e-3


def test_a_rank_pattern_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoHaConfig(r=3, target_modules=["q_proj"], rank_pattern={"q_proj": 2})
    peft.get_peft_model(MODEL_FACTORIES["llama"](), config).save_pretrained(tmp_path / "peft")
    with pytest.raises(PeftFormatError, match="rank_pattern"):
        load_adapter(MODEL_FACTORIES["llama"](), tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "LOHA"


def test_init_is_the_base_model_with_peft_s_shapes():
    method = apply("llama", r=4, target_modules=["q", "down"])
    torch.testing.assert_close(logits(method.model.eval()), logits(MODEL_FACTORIES["llama"]()), rtol=0, atol=0)
    params = method.trainable_parameters()
    assert tuple(params["model.layers.0.mlp.down_proj.hada_w1_a"].shape) == (32, 4)
    assert tuple(params["model.layers.0.mlp.down_proj.hada_w2_b"].shape) == (4, 64)
    assert all(torch.all(p == 0) == k.endswith("hada_w2_b") for k, p in params.items())


def test_gpt2_slice_update_is_the_hadamard_product_of_two_low_rank_products():
    method = apply("gpt2", r=2, alpha=6, target_modules=["v"])
    layer = method.layers["transformer.h.1.attn.c_attn"]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in method.trainable_parameters().values():
            p.copy_(torch.randn_like(p))
    w1 = layer.hada_w1_a["v"] @ layer.hada_w1_b["v"]
    w2 = layer.hada_w2_a["v"] @ layer.hada_w2_b["v"]
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[:, 64:] - layer.base_layer(x)[:, 64:], x @ (3.0 * w1 * w2).T)
        torch.testing.assert_close(layer(x)[:, :64], layer.base_layer(x)[:, :64], rtol=0, atol=0)
