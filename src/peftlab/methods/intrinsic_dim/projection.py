"""Random projections P: R^d -> R^D for intrinsic-dimension training (Li et al. 2018; Aghajanyan et al. 2020).

P is never trained and never saved: it is regenerated from ``seed`` (a CPU ``torch.Generator`` drawn in a fixed
order), so an adapter is just theta_d. P is split into one row block P_i (D_i x d) per target weight matrix i.

Normalisation convention (both kinds): the entries of P have variance 1 / D, so every column of the *whole* P has
squared norm ~ 1 (exactly 1 in expectation) and block i contributes ~ D_i / D of it. A unit step in theta_d moves
the weights by ~ unit L2 norm, however many matrices are targeted.

* Dense: P_i = N(0, 1/D) of shape (D_i, d); memory D * d.
* Fastfood (Le et al. 2013, as Li et al.'s code): per matrix, with L_i = 2^ceil(log2 max(D_i, d)) (padding is done
  per matrix, as Aghajanyan et al.'s per-layer implementation; it at most doubles each block),

      P_i theta = first D_i entries of  S H G Pi H B [theta; 0]      ([theta; 0]: theta zero-padded to L_i)

  with B a random +-1 diagonal, H the (unnormalised, Sylvester-ordered) L x L Walsh-Hadamard matrix applied by the
  O(L log L) fast transform, Pi a random permutation, G a standard Gaussian diagonal and S = 1 / (||G|| sqrt(D))
  a scalar. H B e_j has L entries +-1 and H^T H = L I, so a full column of H G Pi H B has norm exactly
  sqrt(L) ||G||; keeping D_i of the L rows leaves squared norm ~ D_i / L of it, and S brings that to ~ D_i / D.
  Memory O(L_i) per matrix (B, G, Pi), O(D) in all.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def fast_walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """H x along the last dimension, H the unnormalised Sylvester Hadamard matrix (H_2n = [[H, H], [H, -H]]).

    O(L log L) butterflies, never an L x L matrix; differentiable (each step is linear, nothing is saved).

    Args:
        x: (..., L) with L a power of two.

    Returns:
        (..., L), equal to ``x @ H`` (H is symmetric).
    """
    size = x.shape[-1]
    if size & (size - 1) or size == 0:
        raise ValueError(f"fast_walsh_hadamard: the last dimension must be a power of two, got {size}")
    lead = x.shape[:-1]
    half = 1
    while half < size:
        # Pair entry i with i + half inside each block of 2 * half: (a, b) -> (a + b, a - b).
        pairs = x.reshape(*lead, size // (2 * half), 2, half)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        half *= 2
    return x.reshape(*lead, size)


class Projection(nn.Module):
    """One row block P_i (rows x d) of P; ``forward(theta)`` is P_i theta: (d,) -> (rows,)."""

    rows: int
    d: int

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"rows={self.rows}, d={self.d}"


class DenseProjection(Projection):
    """P_i with i.i.d. N(0, 1 / total) entries, stored as a (rows, d) buffer (not saved: regenerated from the seed)."""

    def __init__(self, rows: int, d: int, total: int, generator: torch.Generator) -> None:
        super().__init__()
        self.rows, self.d = rows, d
        matrix = torch.randn(rows, d, generator=generator) / math.sqrt(total)
        self.register_buffer("matrix", matrix, persistent=False)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        return self.matrix.to(theta.dtype) @ theta  # (rows, d) @ (d,) -> (rows,)


class FastfoodProjection(Projection):
    """P_i theta = (S H G Pi H B [theta; 0])[:rows] in O(L log L) time and O(L) memory (module docstring)."""

    def __init__(self, rows: int, d: int, total: int, generator: torch.Generator) -> None:
        super().__init__()
        self.rows, self.d = rows, d
        self.size = 1 << (max(rows, d) - 1).bit_length()  # L = 2^ceil(log2 max(rows, d))
        signs = torch.randint(0, 2, (self.size,), generator=generator).float() * 2 - 1  # B: (L,) of +-1
        perm = torch.randperm(self.size, generator=generator)  # Pi
        gauss = torch.randn(self.size, generator=generator)  # G
        self.register_buffer("signs", signs, persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("gauss", gauss, persistent=False)
        self.scale = 1.0 / (float(gauss.norm()) * math.sqrt(total))  # S

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pad(theta, (0, self.size - self.d))  # (d,) -> (L,)
        x = fast_walsh_hadamard(x * self.signs.to(x.dtype))  # H B x
        x = x[self.perm] * self.gauss.to(x.dtype)  # G Pi
        return fast_walsh_hadamard(x)[: self.rows] * self.scale  # S H, keep D_i rows: (rows,)

    def extra_repr(self) -> str:
        return f"rows={self.rows}, d={self.d}, L={self.size}"


PROJECTION_TYPES: dict[str, type[Projection]] = {"dense": DenseProjection, "fastfood": FastfoodProjection}


def resolve_projection(kind: str, total: int, d: int, dense_max_entries: int) -> str:
    """``"dense"`` or ``"fastfood"``: ``kind`` itself, or for ``"auto"`` dense while total * d <= the cap."""
    if kind == "auto":
        return "dense" if total * d <= dense_max_entries else "fastfood"
    if kind not in PROJECTION_TYPES:
        raise ValueError(f"projection {kind!r} is not one of auto, {', '.join(PROJECTION_TYPES)}")
    return kind


def build_projections(kind: str, sizes: list[int], d: int, seed: int) -> list[Projection]:
    """One projection block per matrix, drawn in order from one generator seeded with ``seed`` (on CPU).

    Args:
        kind: ``"dense"`` or ``"fastfood"`` (already resolved).
        sizes: D_i of each target matrix, in model order; D = sum(sizes).
        d: intrinsic dimension.
        seed: the same seed, sizes and order always give the same P (device-independent: drawn on CPU).

    Returns:
        The blocks P_i; stacking their rows gives P (D x d) with columns of squared norm ~ 1.
    """
    total = sum(sizes)
    generator = torch.Generator().manual_seed(seed)
    cls = PROJECTION_TYPES[kind]
    return [cls(rows, d, total, generator) for rows in sizes]
