"""VeRA against PEFT 0.21.2: the same shared projections from the same key, a PEFT-made adapter imported with the
same logits, PEFT's key layout, the init (lambda_b = 0: the base model), and an adapter saved without projections."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_FACTORIES

from peftlab.interop.adapter_files import load_adapter
from peftlab.methods.budget import count_trainable
from peftlab.methods.io import save_adapter
from peftlab.models.arch import arch_fingerprint
from peftlab.models.shape import model_shape
from peftlab.registry import get_method

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning",
                                                                                "ignore::FutureWarning")]
PEFT_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"]}


def logits(model, ids=None):
    torch.manual_seed(1)
    ids = torch.randint(2, 96, (2, 7)) if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def apply(family: str, **options):
    spec = get_method("vera")
    return spec.apply(MODEL_FACTORIES[family](), spec.build_config(options))


@pytest.mark.parametrize("family", sorted(MODEL_FACTORIES))
def test_a_peft_vera_adapter_imports_with_the_same_projections_and_logits(family, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.VeraConfig(r=6, target_modules=PEFT_TARGETS[family], projection_prng_key=7, d_initial=0.2)
    reference = peft.get_peft_model(MODEL_FACTORIES[family](), config)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "vera_lambda" in name:
                p.add_(0.1 * torch.randn_like(p))
    reference.eval().save_pretrained(tmp_path / "peft")
    expected = logits(reference)

    ours = apply(family, r=6, target_modules=PEFT_TARGETS[family], projection_prng_key=7)
    a, b = ours.projections()  # drawn by our generator from the same key: PEFT's matrices exactly
    assert torch.equal(a, reference.base_model.vera_A["default"])
    assert torch.equal(b, reference.base_model.vera_B["default"])

    fresh = MODEL_FACTORIES[family]()
    imported, record = load_adapter(fresh, tmp_path / "peft")
    assert record["method"] == "vera" and record["method_config"]["projection_prng_key"] == 7
    torch.testing.assert_close(logits(fresh.eval()), expected, rtol=0, atol=1e-5)
    assert (expected - logits(MODEL_FACTORIES[family]())).abs().max() > 1e-3  # the adapter changes the output


def test_init_is_the_base_model_and_lambda_d_starts_at_d_initial():
    method = apply("llama", r=16, d_initial=0.05, target_modules="all-linear")
    torch.testing.assert_close(logits(method.model.eval()), logits(MODEL_FACTORIES["llama"]()), rtol=0, atol=0)
    params = method.trainable_parameters()
    assert all(torch.all(p == 0.05) for k, p in params.items() if k.endswith("vera_lambda_d"))
    assert all(torch.all(p == 0) for k, p in params.items() if ".vera_lambda_b" in k)
    a, b = method.projections()
    assert tuple(a.shape) == (16, 64) and tuple(b.shape) == (64, 16)  # max d_in (down_proj), max d_out (gate/up)
    assert not any(p.requires_grad for n, p in method.model.named_parameters() if "vera_lambda" not in n)


def test_gpt2_slices_share_lambda_d_and_use_the_whole_layers_rows_of_b():
    """q and v of c_attn: one lambda_d (r,), lambda_b per slice; v's update is B[2d:3d] (the whole layer's rows)."""
    method = apply("gpt2", r=4, target_modules=["q", "v"])
    layer = method.layers["transformer.h.0.attn.c_attn"]
    prefix = "transformer.h.0.attn.c_attn."
    keys = [k.removeprefix(prefix) for k in method.trainable_parameters() if k.startswith(prefix)]
    assert sorted(keys) == ["vera_lambda_b.q", "vera_lambda_b.v", "vera_lambda_d"]
    with torch.no_grad():
        layer.vera_lambda_b["v"].fill_(0.5)
    x = torch.randn(3, 32)
    direct = 0.5 * (x @ layer.vera_A.T * layer.vera_lambda_d) @ layer.vera_B[64:96].T
    torch.testing.assert_close(layer(x)[:, 64:96] - layer.base_layer(x)[:, 64:96], direct)
    torch.testing.assert_close(layer(x)[:, :64], layer.base_layer(x)[:, :64], rtol=0, atol=0)
    assert count_trainable("vera", model_shape(method.model.config), {"r": 4, "target_modules": ["q", "v"]}) == \
        2 * (4 + 32 + 32)  # per block: one lambda_d + two 32-wide lambda_b


@pytest.mark.parametrize("save_projection", [True, False])
def test_save_projection_decides_whether_the_adapter_holds_a_and_b(save_projection, tmp_path):
    method = apply("llama", r=8, save_projection=save_projection)
    with torch.no_grad():
        for p in method.trainable_parameters().values():
            p.add_(0.1)
    expected = logits(method.model.eval())
    folder = save_adapter(method, "vera", tmp_path / "a", "tiny", arch_fingerprint(MODEL_FACTORIES["llama"]()))
    from safetensors import safe_open

    with safe_open(str(folder / "adapter.safetensors"), "pt") as f:
        assert ("vera_A" in f.keys()) == save_projection
    fresh = MODEL_FACTORIES["llama"]()
    load_adapter(fresh, folder)
    torch.testing.assert_close(logits(fresh.eval()), expected, rtol=0, atol=1e-6)
