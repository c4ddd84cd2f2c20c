"""How strongly a LoRA update amplifies directions of the frozen weight (Hu et al. 2021, section 7.3, Table 7).

For one adapted weight W (d_out x d_in, the branch's rows for a GPT-2 ``c_attn`` slice) and its update
delta W = scaling * B A (r = LoRA rank), take U (d_out x r) and V (d_in x r), the top-r left/right singular vectors
of a matrix M, and project W onto them:

    ||U^T W V||_F      (r x r; the paper writes U^T W V^T with V^T as r x d_in)

for M = delta W (the directions LoRA changed), M = W (W's own strongest directions: sqrt(s_1^2 + .. + s_r^2)) and
M = a Gaussian random matrix (chance). The amplification factor is ||delta W||_F / ||U^T W V||_F with U, V from
delta W: how much the update scales up directions that W itself barely uses (the paper: ~21.5 for r = 4 on
GPT-3's layer-48 W_q, i.e. delta W amplifies directions already in W but not emphasised by it).

With DoRA the update is the whole change of the weight, f * (W + s B A) - W (f = m / ||W + s B A||_row), which is
not of rank r; its top-r singular directions are used, and entries say ``dora: true``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.analysis.adapters import LoraFactors, read_lora
from peftlab.analysis.output import finite, plt, write_analysis
from peftlab.config import ModelConfig
from peftlab.methods.io import check_base
from peftlab.models.arch import LINEAR_TYPES, resolve_targets

SOURCES = ("delta", "weight", "random")  # whose top-r singular vectors project W


def top_singular_vectors(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V): the top-``r`` left (d_out, r) and right (d_in, r) singular vectors of ``matrix`` (float64)."""
    u, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u[:, :r], vh[:r].T


def projection_norm(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> float:
    """||U^T W V||_F: W (d_out, d_in) seen through U (d_out, r) and V (d_in, r)."""
    return float(torch.linalg.norm(u.T @ weight.double() @ v))


def amplification_stats(delta: torch.Tensor, weight: torch.Tensor, r: int,
                        generator: torch.Generator | None = None) -> dict[str, float | None]:
    """Table 7's numbers for one weight.

    Args:
        delta: the update delta W, (d_out, d_in).
        weight: the frozen W, (d_out, d_in).
        r: how many singular directions to take (the LoRA rank).
        generator: seeds the random matrix of the chance row.

    Returns:
        ``proj_delta``, ``proj_weight``, ``proj_random`` (||U^T W V||_F for each source), ``norm_weight``,
        ``norm_delta`` (Frobenius norms) and ``amplification`` = norm_delta / proj_delta (None when undefined).
    """
    if delta.shape != weight.shape:
        raise ValueError(f"delta W {tuple(delta.shape)} and W {tuple(weight.shape)} differ in shape")
    w = weight.double()
    random = torch.randn(w.shape, generator=generator, dtype=torch.float64)
    proj = {name: projection_norm(w, *top_singular_vectors(m, r))
            for name, m in zip(SOURCES, (delta, w, random), strict=True)}
    norm_delta = float(torch.linalg.norm(delta.double()))
    return {"proj_delta": proj["delta"], "proj_weight": proj["weight"], "proj_random": proj["random"],
            "norm_weight": float(torch.linalg.norm(w)), "norm_delta": norm_delta,
            "amplification": finite(norm_delta / proj["delta"]) if proj["delta"] > 0 else None}


def base_rows(model: nn.Module, factors: LoraFactors) -> torch.Tensor:
    """The frozen weight that ``factors`` updates, as (d_out_branch, d_in), whatever the storage layout.

    Raises:
        ValueError: the module is missing, not linear, or its shape disagrees with A and B.
    """
    try:
        module = model.get_submodule(factors.module)
    except AttributeError as exc:
        raise ValueError(f"the base model has no module {factors.module!r} (adapted by the adapter)") from exc
    if not isinstance(module, LINEAR_TYPES):
        raise ValueError(f"{factors.module} is a {type(module).__name__}, not a linear layer")
    weight = module.weight.detach()
    rows = weight.T if isinstance(module, Conv1D) else weight  # Conv1D stores (in, out); nn.Linear (out, in)
    if factors.branch != "weight":  # an output slice of a fused layer (GPT-2 c_attn q/k/v)
        target = {t.name: t for t in resolve_targets(model, [factors.branch], key="branch")}.get(factors.module)
        if target is None or target.out_slice is None:
            raise ValueError(f"{factors.module}: branch {factors.branch!r} is not an output slice of this layer")
        rows = rows[target.out_slice[0]:target.out_slice[1]]
    expected = (factors.B.shape[0], factors.A.shape[1])
    if tuple(rows.shape) != expected:
        raise ValueError(f"{factors.module} [{factors.branch}]: base weight {tuple(rows.shape)} (out, in) does not "
                         f"match the adapter's B A {expected}")
    return rows.double()


def update_of(factors: LoraFactors, weight: torch.Tensor) -> torch.Tensor:
    """The change of the weight: scaling * B A, or with DoRA f * (W + s B A) - W, f = m / ||W + s B A||_row."""
    delta = factors.delta_weight()
    if factors.magnitude is None:
        return delta
    adapted = weight.double() + delta
    factor = factors.magnitude.double() / torch.linalg.norm(adapted, dim=1)  # (d_out,)
    return factor[:, None] * adapted - weight.double()


def amplification_for_model(folder: str | Path, model: nn.Module, seed: int = 0) -> dict[str, Any]:
    """Table 7's numbers for every branch of the LoRA adapter in ``folder`` on the base ``model``."""
    adapter, factors = read_lora(folder)
    if adapter.format == "peftlab":
        check_base(adapter.config, model, folder)
    generator = torch.Generator().manual_seed(seed)
    entries = []
    for f in factors:
        weight = base_rows(model, f)
        stats = amplification_stats(update_of(f, weight), weight, f.r, generator)
        entries.append({"module": f.module, "branch": f.branch, "layer": f.layer, "kind": f.kind, "r": f.r,
                        "dora": f.magnitude is not None, **stats})
    return {"adapter": str(folder), "base_model": adapter.base_model, "seed": seed, "r": factors[0].r,
            "summary": summarize(entries), "modules": entries}  # small facts first: a report shows the JSON's head


def summarize(entries: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """kind -> mean over layers of each number (the amplification factor: mean of the per-layer factors)."""
    keys = ("norm_weight", "norm_delta", "proj_delta", "proj_weight", "proj_random", "amplification")
    out = {}
    for kind in sorted({e["kind"] for e in entries}):
        rows = [e for e in entries if e["kind"] == kind]
        out[kind] = {"n_layers": len(rows)}
        for key in keys:
            values = [e[key] for e in rows if e[key] is not None]
            out[kind][key] = finite(float(np.mean(values))) if values else None
    return out


def plot_amplification(data: dict[str, Any]) -> plt.Figure:
    """Rows = module kinds; left: ||U^T W V||_F per layer for each source (and the norms); right: the factor."""
    kinds = sorted(data["summary"])
    fig, axes = plt.subplots(len(kinds), 2, squeeze=False, figsize=(11, 3.0 * len(kinds) + 0.6))
    styles = {"proj_delta": ("U, V of delta W", "C0", "o-"), "proj_weight": ("U, V of W", "C1", "s-"),
              "proj_random": ("U, V of random", "C2", "^-"), "norm_delta": ("||delta W||_F", "C3", "--"),
              "norm_weight": ("||W||_F", "C7", ":")}
    for row, kind in enumerate(kinds):
        rows = sorted((e for e in data["modules"] if e["kind"] == kind), key=lambda e: (e["layer"] is None,
                                                                                          e["layer"] or 0))
        x = [e["layer"] if e["layer"] is not None else -1 for e in rows]
        left, right = axes[row]
        for key, (label, color, style) in styles.items():
            left.plot(x, [e[key] for e in rows], style, color=color, label=label, markersize=3)
        left.set_yscale("log")
        left.set_title(f"{kind}: ||U^T W V||_F (r={data['r']})", fontsize=9)
        right.plot(x, [e["amplification"] if e["amplification"] is not None else np.nan for e in rows], "o-",
                   color="C0", markersize=3)
        right.set_title(f"{kind}: amplification ||delta W||_F / ||U^T W V||_F", fontsize=9)
        for ax in (left, right):
            ax.set_xlabel("layer", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        if row == 0:
            left.legend(fontsize=7)
    fig.suptitle(f"Amplification (Hu et al. 2021, Table 7): {data['adapter']}", fontsize=10)
    fig.tight_layout()
    return fig


def run_amplification(folder: str | Path, out: str | Path, stem: str = "amplification", model_name: str | None = None,
                      seed: int = 0, device: str = "cpu") -> Path:
    """Load the adapter's base model (or ``model_name``), compute Table 7 per module, write JSON + PNG."""
    from peftlab.models.loading import load_model_and_tokenizer

    adapter, _ = read_lora(folder)
    name = model_name or adapter.base_model
    if not name:
        raise ValueError(f"{folder}: the adapter config names no base model; pass --model")
    print(f"[amplification] loading base model {name}", file=sys.stderr)
    model, _ = load_model_and_tokenizer(ModelConfig(name=name), device)
    data = amplification_for_model(folder, model, seed)
    data["base_model"] = name
    return write_analysis(out, stem, "amplification", data, plot_amplification(data))
