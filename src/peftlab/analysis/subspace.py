"""Normalized subspace similarity between two LoRA adapters (Hu et al. 2021, section 7.2 and Fig. 3).

For one adapted module, take the SVD of each adapter's A (r x d_in): A = U S V^T. The paper calls V (d_in x r,
columns ordered by decreasing singular value) "the right-singular unitary matrix" U_A: its columns span the row
space of A, i.e. the input directions the update reads (delta W = s B A only sees x through A x). Then

    phi(i, j) = ||U_A[:, :i]^T U_B[:, :j]||_F^2 / min(i, j)  in [0, 1]        (U_A: d_in x r_a, U_B: d_in x r_b)

is the fraction of the smaller of the two top-i / top-j subspaces that lies inside the other (1: one contains the
other, 0: orthogonal). ``matrix="B"`` does the same with the left-singular vectors of B (d_out x r): the output
directions the update writes to. For two independent random subspaces E ||U_i^T U_j||_F^2 = i j / d, so the
chance level is E phi(i, j) = max(i, j) / d; it is recorded for comparison.

Typical use: r = 8 vs r = 64 (does the small rank find the top directions of the large one?), or two seeds.
Caveat: A starts from a random (kaiming) init and, in short runs, stays close to it; two runs with the same seed
and rank start from the same A, so their phi on A is high whatever they learned. Compare different seeds (as the
paper does), or look at ``matrix="B"`` (B starts at zero, so its directions are all learned).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftlab.analysis.adapters import LoraFactors, read_lora
from peftlab.analysis.output import plt, write_analysis

MATRICES = ("A", "B")
MAX_AUTO_LAYERS = 6  # layers drawn when none are chosen: evenly spaced, first and last included


def subspace_basis(factors: LoraFactors, matrix: str = "A") -> torch.Tensor:
    """Orthonormal basis of the update's input (``"A"``) or output (``"B"``) directions, strongest first.

    Returns:
        ``"A"``: the right-singular vectors of A, (d_in, r); ``"B"``: the left-singular vectors of B, (d_out, r).
        Float64; column k belongs to the k-th largest singular value.
    """
    if matrix == "A":
        _, _, vh = torch.linalg.svd(factors.A.double(), full_matrices=False)  # A: (r, d_in) -> Vh: (r, d_in)
        return vh.T
    if matrix == "B":
        u, _, _ = torch.linalg.svd(factors.B.double(), full_matrices=False)  # B: (d_out, r) -> U: (d_out, r)
        return u
    raise ValueError(f"matrix: {matrix!r} is not one of {', '.join(MATRICES)}")


def subspace_similarity(u_a: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    """phi(i, j) for every 1 <= i <= p, 1 <= j <= q, as a (p, q) tensor (entry [i-1, j-1]).

    Args:
        u_a: (d, p) orthonormal columns, strongest first.
        u_b: (d, q) orthonormal columns, strongest first.
    """
    if u_a.shape[0] != u_b.shape[0]:
        raise ValueError(f"the two bases live in different spaces: d = {u_a.shape[0]} vs {u_b.shape[0]}")
    overlap = (u_a.double().T @ u_b.double()) ** 2  # (p, q): squared cosines between basis vectors
    captured = overlap.cumsum(0).cumsum(1)  # [i-1, j-1] = ||U_A[:, :i]^T U_B[:, :j]||_F^2
    i = torch.arange(1, u_a.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, u_b.shape[1] + 1, dtype=torch.float64)[None, :]
    return captured / torch.minimum(i, j)


def compare_adapters(folder_a: str | Path, folder_b: str | Path, matrix: str = "A") -> dict[str, Any]:
    """phi for every module/branch adapted in both adapters, plus per-kind means over layers.

    Raises:
        ValueError: no module is adapted in both, or a module's bases have different dimensions.
    """
    _, fa = read_lora(folder_a)
    _, fb = read_lora(folder_b)
    by_key_b = {f.key: f for f in fb}
    common = [f for f in fa if f.key in by_key_b]
    if not common:
        raise ValueError(f"{folder_a} and {folder_b} adapt no module in common (e.g. {fa[0].module} "
                         f"[{fa[0].branch}] vs {fb[0].module} [{fb[0].branch}])")
    only_a, only_b = len(fa) - len(common), len(fb) - len(common)
    if only_a or only_b:
        print(f"[subspace] comparing {len(common)} common modules; {only_a} only in {folder_a}, {only_b} only in "
              f"{folder_b}", file=sys.stderr)
    entries = []
    for f in common:
        u_a, u_b = subspace_basis(f, matrix), subspace_basis(by_key_b[f.key], matrix)
        try:
            phi = subspace_similarity(u_a, u_b)
        except ValueError as exc:
            raise ValueError(f"{f.module} [{f.branch}]: {exc}") from exc
        entries.append(_entry(f, phi, u_a.shape[0]))
    # small facts first: a report shows the head of the JSON
    return {"adapter_a": str(folder_a), "adapter_b": str(folder_b), "matrix": matrix,
            "basis": "right-singular vectors of A (input directions)" if matrix == "A"
            else "left-singular vectors of B (output directions)",
            "r_a": entries[0]["r_a"], "r_b": entries[0]["r_b"], "only_in_a": only_a, "only_in_b": only_b,
            "summary": _summary(entries), "mean_over_layers": _kind_means(entries), "modules": entries}


def _summary(entries: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """kind -> the scalar columns of :func:`_entry` averaged over layers, and the number of layers."""
    keys = ("phi_1_1", "phi_1_all", "phi_all_all", "random_1_1", "random_1_all", "random_all_all")
    out = {}
    for kind in sorted({e["kind"] for e in entries}):
        rows = [e for e in entries if e["kind"] == kind]
        out[kind] = {"n_layers": len(rows), **{k: float(np.mean([e[k] for e in rows])) for k in keys}}
    return out


def _entry(f: LoraFactors, phi: torch.Tensor, dim: int) -> dict[str, Any]:
    p, q = phi.shape
    return {"module": f.module, "branch": f.branch, "layer": f.layer, "kind": f.kind, "dim": dim, "r_a": p,
            "r_b": q, "phi": phi.tolist(), "phi_1_1": float(phi[0, 0]), "phi_1_all": float(phi[0, -1]),
            "phi_all_all": float(phi[-1, -1]),
            # chance levels for independent random subspaces: E phi(i, j) = max(i, j) / d
            "random_1_1": 1 / dim, "random_1_all": q / dim, "random_all_all": max(p, q) / dim}


def _kind_means(entries: list[dict[str, Any]]) -> dict[str, list[list[float]]]:
    """kind -> phi averaged over the layers that adapt it (only where every layer has the same ranks)."""
    means = {}
    for kind in sorted({e["kind"] for e in entries}):
        mats = [np.asarray(e["phi"]) for e in entries if e["kind"] == kind]
        if len({m.shape for m in mats}) == 1:
            means[kind] = np.mean(mats, axis=0).tolist()
    return means


def shown_layers(entries: list[dict[str, Any]], layers: list[int] | str | None) -> list[int]:
    """The layers drawn: ``layers`` (checked against those present), ``"all"``, or (None) up to 6 evenly spaced
    ones, first and last included."""
    present = sorted({e["layer"] for e in entries if e["layer"] is not None})
    if layers == "all":
        return present
    if layers is not None:
        missing = sorted(set(layers) - set(present))
        if missing:
            raise ValueError(f"layers {missing} are not adapted in both adapters; present: {present}")
        return sorted(set(layers))
    if len(present) <= MAX_AUTO_LAYERS:
        return present
    picks = np.linspace(0, len(present) - 1, MAX_AUTO_LAYERS).round().astype(int)
    return [present[k] for k in sorted(set(picks.tolist()))]


def plot_subspace(data: dict[str, Any], layers: list[int]) -> plt.Figure:
    """A heatmap grid: rows = module kinds, columns = the chosen layers and the mean over all layers."""
    kinds = sorted({e["kind"] for e in data["modules"]})
    by_key = {(e["kind"], e["layer"]): e for e in data["modules"]}
    columns: list[int | str] = [*layers, "mean"]
    r_a, r_b = data["r_a"], data["r_b"]
    fig, axes = plt.subplots(len(kinds), len(columns), squeeze=False, layout="constrained",
                             figsize=(2.2 * len(columns) + 1, (1.0 + 0.12 * r_a) * len(kinds) + 0.8))
    image = None
    for row, kind in enumerate(kinds):
        for col, layer in enumerate(columns):
            ax = axes[row][col]
            phi = data["mean_over_layers"].get(kind) if layer == "mean" else by_key.get((kind, layer), {}).get("phi")
            if phi is None:
                ax.set_axis_off()
                continue
            image = ax.imshow(np.asarray(phi), vmin=0, vmax=1, cmap="viridis", aspect="auto",
                              extent=(0.5, len(phi[0]) + 0.5, len(phi) + 0.5, 0.5), interpolation="nearest")
            ax.set_title(f"{kind}  {'mean of layers' if layer == 'mean' else f'layer {layer}'}", fontsize=8)
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel(f"i (top-i of r={r_a})", fontsize=7)
            if row == len(kinds) - 1:
                ax.set_xlabel(f"j (top-j of r={r_b})", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, aspect=30, label="phi(i, j)")
    fig.suptitle(f"Subspace similarity phi(i, j) of {_label(data['adapter_a'])} vs {_label(data['adapter_b'])}\n"
                 f"(basis: {data['basis']})", fontsize=9)
    return fig


def _label(folder: str) -> str:
    """``runs/x/adapter`` -> ``x/adapter`` (the run's name says more than ``adapter``)."""
    path = Path(folder)
    return f"{path.parent.name}/{path.name}" if path.name == "adapter" and path.parent.name else str(path)


def run_subspace(folder_a: str | Path, folder_b: str | Path, out: str | Path, stem: str = "subspace",
                 matrix: str = "A", layers: list[int] | str | None = None) -> Path:
    """Compute phi for two adapters and write ``<out>/<stem>.json`` + ``.png``; returns the JSON path."""
    data = compare_adapters(folder_a, folder_b, matrix)
    chosen = shown_layers(data["modules"], layers)
    data["figure_layers"] = chosen
    return write_analysis(out, stem, "subspace", data, plot_subspace(data, chosen))
