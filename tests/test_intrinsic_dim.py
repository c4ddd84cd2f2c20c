"""Intrinsic-dimension training (method=intrinsic-dim) on tiny GPT-2 and Llama: projections, training, save/load."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import MODEL_FACTORIES, tiny_gpt2, tiny_llama
from torch import nn
from torch.nn.utils import parametrize

import peftlab.methods.intrinsic_dim  # noqa: F401  registers the method
from peftlab.config import ConfigError
from peftlab.interop.adapter_files import load_adapter
from peftlab.methods import get_method
from peftlab.methods.intrinsic_dim import (
    DenseProjection,
    FastfoodProjection,
    IntrinsicDimMethod,
    build_projections,
    fast_walsh_hadamard,
)
from peftlab.methods.intrinsic_dim.projection import resolve_projection
from peftlab.methods.io import save_adapter
from peftlab.models.arch import arch_fingerprint
from peftlab.training.loss import target_only_loss

# Linear matrices per block of the tiny models (GPT-2: c_attn, attn.c_proj, c_fc, mlp.c_proj; Llama: q k v o gate
# up down) and their total size D (GPT-2: 3d^2 + d^2 + 4d^2 + 4d^2 per block, d = 32; Llama k/v are 32 x 16).
N_MATRICES = {"gpt2": 2 * 4, "llama": 2 * 7}
TOTAL_D = {"gpt2": 2 * 12 * 32 * 32, "llama": 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64)}


pytestmark = pytest.mark.usefixtures("one_thread")


def apply(model: nn.Module, **options: Any) -> IntrinsicDimMethod:
    spec = get_method("intrinsic-dim")
    return spec.apply(model, spec.build_config(options))


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def perturb(method: IntrinsicDimMethod, seed: int = 3) -> None:
    """Give theta_d (and lambda) non-trivial values, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in method.trainable_parameters().values():
            param.add_(torch.randn(param.shape, generator=gen) * 0.5)


def hadamard(size: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix H_2n = [[H, H], [H, -H]], built explicitly."""
    h = torch.ones(1, 1)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def columns(blocks: list, d: int) -> torch.Tensor:
    """P (D x d) built column by column: P e_j for each unit vector e_j, blocks stacked by rows."""
    eye = torch.eye(d, dtype=torch.float64)
    return torch.cat([torch.stack([b(eye[j].float()).double() for j in range(d)], 1) for b in blocks], 0)


# ---- projections ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 8, 64])
def test_fast_walsh_hadamard_equals_the_matrix_product(size):
    x = torch.randn(3, size, dtype=torch.float64)
    assert torch.allclose(fast_walsh_hadamard(x), x @ hadamard(size).double(), atol=1e-10)


def test_fast_walsh_hadamard_rejects_other_sizes():
    with pytest.raises(ValueError, match="power of two"):
        fast_walsh_hadamard(torch.randn(12))


@pytest.mark.parametrize("rows,d", [(100, 12), (7, 20), (64, 64)])
def test_fastfood_equals_its_explicit_dense_matrix(rows, d):
    proj = FastfoodProjection(rows, d, total=rows, generator=torch.Generator().manual_seed(5))
    matrix = columns([proj], d)  # (rows, d)
    theta = torch.randn(d)
    assert torch.allclose(matrix.float() @ theta, proj(theta), atol=1e-5)
    # The same matrix from its factors: S H G Pi H B, padded input (first d columns), first `rows` rows.
    size = proj.size
    assert size == 1 << (max(rows, d) - 1).bit_length()
    h = hadamard(size).double()
    permutation = torch.eye(size, dtype=torch.float64)[proj.perm]  # (Pi x)_i = x[perm[i]]
    factors = proj.scale * h @ torch.diag(proj.gauss.double()) @ permutation @ h @ torch.diag(proj.signs.double())
    assert torch.allclose(factors[:rows, :d], matrix, atol=1e-5)


@pytest.mark.parametrize("kind", ["fastfood", "dense"])
def test_projection_columns_have_unit_norm_over_all_blocks(kind):
    d = 48
    blocks = build_projections(kind, [300, 1000, 2048, 40, 700], d, seed=1)
    matrix = columns(blocks, d)
    assert matrix.shape == (4088, d)
    norms = matrix.norm(dim=0)
    assert ((norms > 0.9) & (norms < 1.1)).all(), norms
    # Block i carries ~ D_i / D of each column's squared norm (the 2048-row block: ~ 0.5).
    big = matrix[1300:3348].norm(dim=0).pow(2).mean()
    assert abs(float(big) - 2048 / 4088) < 0.1


def test_projections_are_regenerated_from_the_seed():
    first = build_projections("fastfood", [100, 50], 8, seed=4)
    again = build_projections("fastfood", [100, 50], 8, seed=4)
    other = build_projections("fastfood", [100, 50], 8, seed=5)
    theta = torch.randn(8)
    assert all(torch.equal(a(theta), b(theta)) for a, b in zip(first, again, strict=True))
    assert not torch.allclose(first[0](theta), other[0](theta))
    dense = build_projections("dense", [100], 8, seed=4)
    assert isinstance(dense[0], DenseProjection) and dense[0].matrix.shape == (100, 8)


def test_auto_projection_picks_dense_only_for_small_matrices():
    assert resolve_projection("auto", 1000, 100, dense_max_entries=100_000) == "dense"
    assert resolve_projection("auto", 1001, 100, dense_max_entries=100_000) == "fastfood"
    assert resolve_projection("fastfood", 10, 10, dense_max_entries=100_000) == "fastfood"


# ---- the method on tiny models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("said", [False, True])
def test_only_theta_trains_with_exact_count(tiny_model, said):
    method = apply(tiny_model, d=37, said=said)
    fam = tiny_model.config.model_type
    trainable = [p for p in tiny_model.parameters() if p.requires_grad]
    expected = 37 + (N_MATRICES[fam] if said else 0)
    assert sum(p.numel() for p in trainable) == expected
    assert {id(p) for p in trainable} == {id(p) for p in method.trainable_parameters().values()}
    assert sorted(method.trainable_parameters()) == (["said_lambda", "theta_d"] if said else ["theta_d"])
    info = method.describe()
    assert info["D"] == TOTAL_D[fam] and info["n_matrices"] == N_MATRICES[fam]
    assert info["projection"] == "dense"  # auto: D * d is far below the cap


@pytest.mark.parametrize("options", [{"projection": "dense"}, {"projection": "fastfood", "said": True}])
def test_output_unchanged_at_init(tiny_model, batch, options):
    before = logits(tiny_model, batch)
    apply(tiny_model, d=40, **options)
    assert torch.equal(logits(tiny_model, batch), before)


def test_weight_is_base_plus_projected_theta_on_gpt2_slices():
    """GPT-2 q and v are slices of the fused c_attn: their columns move, k's do not; the offset is P_i theta."""
    model = tiny_gpt2()
    w0 = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # Conv1D: (in, 3 * out)
    method = apply(model, d=16, target_modules=["q", "v"], projection="dense", seed=2)
    perturb(method)
    theta = method.theta.detach()
    blocks = build_projections("dense", [32 * 32] * 4, 16, seed=2)  # model order: block 0 q, block 0 v, ...
    weight = model.transformer.h[0].attn.c_attn.weight.detach()
    assert torch.allclose(weight[:, :32], w0[:, :32] + (blocks[0].matrix @ theta).view(32, 32), atol=1e-6)
    assert torch.equal(weight[:, 32:64], w0[:, 32:64])
    assert torch.allclose(weight[:, 64:], w0[:, 64:] + (blocks[1].matrix @ theta).view(32, 32), atol=1e-6)


def test_said_scales_each_matrix_offset(batch):
    model = tiny_llama()
    base = logits(model, batch)
    method = apply(model, d=24, said=True)
    perturb(method)
    layer = model.model.layers[1].mlp.down_proj
    w0 = layer.parametrizations.weight.original.detach()
    with torch.no_grad():
        method.said_lambda.fill_(1.0)
        one = layer.weight.detach() - w0
        method.said_lambda.fill_(2.0)
        assert torch.allclose(layer.weight.detach() - w0, 2 * one, atol=1e-6)
        method.said_lambda.zero_()
    assert torch.allclose(logits(model, batch), base, atol=1e-6)  # lambda = 0 switches every offset off


@pytest.mark.parametrize("options", [{"projection": "dense"}, {"projection": "fastfood"},
                                     {"projection": "fastfood", "said": True}])
def test_ten_adamw_steps_lower_the_loss(tiny_model, batch, options):
    method = apply(tiny_model, d=64, **options)
    params = list(method.trainable_parameters().values())
    initial = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=5e-2, weight_decay=0.0)
    losses = []
    for _ in range(10):
        total, count = target_only_loss(tiny_model, batch)
        loss = total / count
        optimizer.zero_grad()
        loss.backward()
        assert method.theta.grad.abs().sum() > 0  # (lambda's gradient is 0 at step 0: the offset P theta_d is 0)
        optimizer.step()
        losses.append(loss.item())
    final = target_only_loss(tiny_model, batch)
    assert final[0].item() / final[1] < losses[0] - 0.05, losses
    assert all(p.grad is None for p in tiny_model.parameters() if not p.requires_grad)
    assert all(not torch.equal(p, p0) for p, p0 in zip(params, initial, strict=True))


@pytest.mark.parametrize("projection", ["dense", "fastfood"])
def test_save_then_fresh_apply_and_load_reproduces_logits(tmp_path, batch, projection):
    for name, factory in MODEL_FACTORIES.items():
        model = factory()
        fingerprint = arch_fingerprint(model)
        method = apply(model, d=30, projection=projection, said=True, seed=7)
        perturb(method)
        expected = logits(model, batch)
        folder = save_adapter(method, "intrinsic-dim", tmp_path / name, "tiny", fingerprint)
        fresh = factory()
        loaded, config = load_adapter(fresh, folder)  # re-applies with the saved seed, then loads theta_d
        assert config["method_config"]["seed"] == 7
        assert isinstance(loaded, IntrinsicDimMethod)
        assert torch.equal(logits(fresh, batch), expected)
        other = factory()  # the same theta_d under another seed's projection is a different model
        reseeded = apply(other, d=30, projection=projection, said=True, seed=8)
        reseeded.load_adapter_state_dict(method.adapter_state_dict())
        assert not torch.allclose(logits(other, batch), expected, atol=1e-4)


@pytest.mark.parametrize("projection", ["dense", "fastfood"])
def test_merge_equals_unmerged_and_unmerge_restores(tiny_model, batch, projection):
    method = apply(tiny_model, d=32, projection=projection, said=True)
    perturb(method)
    unmerged = logits(tiny_model, batch)
    assert method.mergeable
    method.merge()
    assert not any(parametrize.is_parametrized(m) for m in tiny_model.modules())
    assert torch.allclose(logits(tiny_model, batch), unmerged, atol=1e-5)
    method.unmerge()
    assert torch.allclose(logits(tiny_model, batch), unmerged, atol=1e-5)
    with torch.no_grad():
        method.theta.zero_()  # the restored parametrization still follows theta_d
    base = MODEL_FACTORIES[tiny_model.config.model_type]()
    assert torch.allclose(logits(tiny_model, batch), logits(base, batch), atol=1e-5)


def test_tied_head_target_is_not_merged(batch):
    model = tiny_llama()  # lm_head.weight is the input embedding
    method = apply(model, d=8, target_modules=["lm_head"])
    perturb(method)
    assert not method.mergeable
    with pytest.warns(UserWarning, match="not merged"):
        method.merge()
    assert parametrize.is_parametrized(model.lm_head)
    assert torch.equal(model.model.embed_tokens.weight, tiny_llama().model.embed_tokens.weight)


def test_regex_targets_and_double_apply():
    model = tiny_llama()
    method = apply(model, d=8, target_modules=r"model\.layers\.0\.self_attn\.(q|v)_proj")
    assert method.describe()["n_matrices"] == 2
    assert method.total == 32 * 32 + 32 * 16  # q: 32 x 32, v: 16 x 32 (2 KV heads of 8 dims)
    with pytest.raises(ValueError, match="already applied"):
        apply(model, d=8)


@pytest.mark.parametrize("options,key", [
    ({"d": 0}, "method.d"), ({"d": 2.5}, "method.d"), ({"d": True}, "method.d"),
    ({"projection": "sparse"}, "method.projection"), ({"said": "yes"}, "method.said"),
    ({"seed": -1}, "method.seed"), ({"target_modules": []}, "method.target_modules"),
    ({"target_modules": ""}, "method.target_modules"), ({"dim": 10}, "method.dim"),
])
def test_bad_options_raise_config_error_naming_the_key(options, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        get_method("intrinsic-dim").build_config(options)


def test_unknown_target_raises_config_error():
    with pytest.raises(ConfigError, match=r"method\.target_modules.*nonexistent"):
        apply(tiny_gpt2(), d=4, target_modules=["nonexistent"])
