"""OFT against PEFT 0.21.2 (PEFT-made adapters import with PEFT's logits and ours export to PEFT's, for every option
that changes the rotation) and the direct formula y = x R W^T + b with R = diag(Cayley(Q_i)) on GPT-2's Conv1D
slices, which PEFT cannot wrap."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MODEL_FACTORIES

from peftlab.interop.adapter_files import load_adapter
from peftlab.interop.export_peft import save_peft_adapter
from peftlab.interop.peft_format import PeftFormatError
from peftlab.methods.oft.blocks import block_layout, drop_blocks
from peftlab.options import ConfigError
from peftlab.registry import get_method

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning",
                                                                                "ignore::FutureWarning")]
TARGETS = ["q_proj", "o_proj", "up_proj", "down_proj"]  # d_in 32, 32, 32, 64


def logits(model):
    torch.manual_seed(1)
    with torch.no_grad():
        return model(input_ids=torch.randint(2, 96, (2, 7))).logits


def apply(family: str, **options):
    spec = get_method("oft")
    return spec.apply(MODEL_FACTORIES[family](), spec.build_config(options))


def perturb(params, scale: float = 0.1) -> None:
    torch.manual_seed(5)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn_like(p))


OPTIONS = {
    "neumann-5": {"oft_block_size": 8},
    "exact-cayley-by-r": {"r": 4, "oft_block_size": 0, "use_cayley_neumann": False},
    "shared-block-3-terms": {"oft_block_size": 16, "block_share": True, "num_cayley_neumann_terms": 3},
    "coft": {"oft_block_size": 8, "coft": True, "eps": 0.05},
    "divisor-rule": {"oft_block_size": 6},  # 6 divides neither 32 nor 64: both round to 4 (tie 4 / 8: the lower)
    "module-dropout": {"oft_block_size": 8, "module_dropout": 0.5},  # training only: the same logits in eval
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS)
def test_a_peft_oft_adapter_imports_with_the_same_logits(options, tmp_path):
    peft = pytest.importorskip("peft")
    reference = peft.get_peft_model(MODEL_FACTORIES["llama"](),
                                    peft.OFTConfig(target_modules=TARGETS, **{"r": 0, **options}))
    perturb(p for n, p in reference.named_parameters() if "oft_R" in n)
    reference.eval().save_pretrained(tmp_path / "peft")
    expected = logits(reference)  # after PEFT's own COFT projection, which the forward does in place
    fresh = MODEL_FACTORIES["llama"]()
    imported, record = load_adapter(fresh, tmp_path / "peft")
    assert record["method"] == "oft"
    assert {k: record["method_config"][k] for k in options} == options
    torch.testing.assert_close(logits(fresh.eval()), expected, rtol=0, atol=1e-5)
    assert (expected - logits(MODEL_FACTORIES["llama"]())).abs().max() > 1e-3


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS)
def test_our_oft_adapter_has_the_same_logits_in_peft(options, tmp_path):
    peft = pytest.importorskip("peft")
    method = apply("llama", target_modules=["q", "o", "up", "down"], **{"r": 0, **options})
    perturb(method.trainable_parameters().values())
    expected = logits(method.model.eval())
    out = save_peft_adapter(method, "oft", tmp_path / "peft", base_model_name_or_path="tiny")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "OFT" and config["peft_version"] == "0.21.2"
    reference = peft.PeftModel.from_pretrained(MODEL_FACTORIES["llama"](), out).eval()
    torch.testing.assert_close(logits(reference), expected, rtol=0, atol=1e-5)


def test_init_is_the_base_model_with_peft_s_shapes():
    method = apply("llama", oft_block_size=8, target_modules=["q", "down"])
    torch.testing.assert_close(logits(method.model.eval()), logits(MODEL_FACTORIES["llama"]()), rtol=0, atol=0)
    params = method.trainable_parameters()
    assert tuple(params["model.layers.0.self_attn.q_proj.oft_R.weight"].shape) == (4, 28)  # 32 / 8 blocks, 8*7/2
    assert tuple(params["model.layers.0.mlp.down_proj.oft_R.weight"].shape) == (8, 28)
    shared = apply("llama", oft_block_size=8, block_share=True, target_modules=["down"]).trainable_parameters()
    assert [tuple(p.shape) for p in shared.values()] == [(1, 28), (1, 28)]


def _direct_rotation(q: torch.Tensor, b: int) -> torch.Tensor:
    """diag((I - Q_i)(I + Q_i)^-1) written out: q (n, b(b-1)/2) -> (n b, n b)."""
    blocks = []
    for row in q:
        u = torch.zeros(b, b)
        u[torch.triu_indices(b, b, 1).unbind()] = row
        skew = u - u.T
        blocks.append((torch.eye(b) - skew) @ torch.linalg.inv(torch.eye(b) + skew))
    return torch.block_diag(*blocks)


def test_gpt2_slice_output_is_the_rotated_input_through_its_rows():
    method = apply("gpt2", oft_block_size=8, use_cayley_neumann=False, target_modules=["v"])
    layer = method.layers["transformer.h.1.attn.c_attn"]
    perturb(method.trainable_parameters().values(), 0.3)
    rotation = _direct_rotation(layer.oft_R["v"].detach(), 8)  # (32, 32)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(32), rtol=0, atol=1e-5)  # orthogonal
    w, bias = layer.base_layer.weight, layer.base_layer.bias  # Conv1D: (d_in, 3d)
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[:, 64:], x @ rotation @ w[:, 64:] + bias[64:], rtol=0, atol=1e-5)
        torch.testing.assert_close(layer(x)[:, :64], layer.base_layer(x)[:, :64], rtol=0, atol=0)
        before = w[:, 64:].T.norm(dim=1).clone()  # row norms of W_v (32 rows of d_in)
        method.merge()
        torch.testing.assert_close(w[:, 64:].T.norm(dim=1), before, rtol=0, atol=1e-5)  # rotations keep norms


def test_the_neumann_series_is_peft_s():
    """Five terms: R = I + 2Q + 2Q^2 + 2Q^3 + Q^4 (PEFT >= 0.18); three: I + 2Q + 2Q^2 + Q^3."""
    for terms, coefficients in ((5, (1, 2, 2, 2, 1)), (3, (1, 2, 2, 1)), (2, (1, 2)), (1, (1,))):
        method = apply("llama", oft_block_size=4, num_cayley_neumann_terms=terms, target_modules=["q"])
        layer = method.layers["model.layers.0.self_attn.q_proj"]
        perturb(method.trainable_parameters().values())
        u = torch.zeros(4, 4)
        u[torch.triu_indices(4, 4, 1).unbind()] = layer.oft_R["weight"][0].detach()
        q = u - u.T
        direct = sum(c * torch.linalg.matrix_power(q, k) for k, c in enumerate(coefficients))
        torch.testing.assert_close(layer.rotations("weight")[0].detach(), direct, rtol=0, atol=1e-6)


def test_coft_projects_each_q_into_its_ball_in_place():
    method = apply("llama", oft_block_size=8, coft=True, eps=0.05, target_modules=["q"])
    perturb(method.trainable_parameters().values())
    layer = method.layers["model.layers.0.self_attn.q_proj"]
    logits(method.model)
    q = layer.oft_R["weight"].detach()  # (4, 28): radius 0.05 / sqrt(4); ||Q_i||_F = sqrt(2) ||u_i||
    norms = 2**0.5 * q.norm(dim=1)
    torch.testing.assert_close(norms, torch.full((4,), 0.025), rtol=1e-5, atol=0)


def test_module_dropout_sets_whole_blocks_to_the_identity_while_training_only():
    method = apply("llama", oft_block_size=4, module_dropout=0.5, target_modules=["down"])  # 16 blocks of 4
    perturb(method.trainable_parameters().values())
    layer = method.layers["model.layers.0.mlp.down_proj"]
    eye = torch.eye(4)
    torch.manual_seed(0)
    dropped = drop_blocks(layer.rotations("weight"), 0.5).detach()
    assert sum(bool(torch.equal(block, eye)) for block in dropped) == 8  # int(0.5 * 16), drawn at random
    x = torch.randn(3, 64)
    with torch.no_grad():
        layer.eval()
        assert torch.equal(layer(x), layer(x))
        layer.train()
        assert not torch.allclose(layer(x), layer.eval()(x))


def test_a_block_size_that_does_not_divide_d_in_becomes_the_nearest_divisor_with_a_warning():
    assert [block_layout(32, 0, b) for b in (6, 7, 12, 33)] == [(8, 4), (4, 8), (4, 8), (1, 32)]
    assert [block_layout(64, r, 0) for r in (3, 5, 100)] == [(2, 32), (4, 16), (64, 1)]
    with pytest.warns(UserWarning, match=r"method.oft_block_size=6 does not divide model.layers.0.self_attn.q_proj's "
                                         r"32 inputs; it uses 8 blocks of 4"):
        apply("llama", oft_block_size=6, target_modules=["q"])


@pytest.mark.parametrize(("options", "match"), [
    ({"r": 4}, r"method.r / method.oft_block_size: set exactly one of the two"),
    ({"r": 0, "oft_block_size": 0}, r"method.r / method.oft_block_size: set exactly one of the two"),
    ({"oft_block_size": 1}, r"method.oft_block_size: must be 0 or an integer >= 2"),
    ({"module_dropout": 1.0}, r"method.module_dropout: must be in \[0, 1\)"),
    ({"num_cayley_neumann_terms": 0}, r"method.num_cayley_neumann_terms: must be an integer >= 1"),
    ({"eps": 0}, r"method.eps: must be a number > 0"),
])
def test_bad_options_name_the_key(options, match):
    with pytest.raises(ConfigError, match=match):
        get_method("oft").build_config(options)


def test_old_peft_oft_files_are_refused_or_warned_about(tmp_path):
    peft = pytest.importorskip("peft")
    reference = peft.get_peft_model(MODEL_FACTORIES["llama"](), peft.OFTConfig(oft_block_size=8, r=0,
                                                                                target_modules=["q_proj"]))
    reference.save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "peft_version": "0.17.1"}))
    with pytest.warns(UserWarning, match="written by PEFT 0.17.1 with the Cayley-Neumann series"):
        load_adapter(MODEL_FACTORIES["llama"](), tmp_path / "peft")
    path.write_text(json.dumps({k: v for k, v in config.items() if k != "oft_block_size"}))
    with pytest.raises(PeftFormatError, match="without 'oft_block_size' was written by PEFT < 0.14"):
        load_adapter(MODEL_FACTORIES["llama"](), tmp_path / "peft")
