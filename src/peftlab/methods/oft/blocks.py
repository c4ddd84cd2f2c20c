"""OFT's block layout and rotation math (Qiu et al. 2023, https://arxiv.org/abs/2306.07280), as PEFT 0.21.2 computes
them; shared by the layer (:mod:`.layer`) and the count (:mod:`.count`).

Each of a layer's n blocks is a b x b rotation R_i = Cayley(Q_i) of a skew-symmetric Q_i = U - U^T, U holding the
b(b-1)/2 trained values above the diagonal (row-major, ``torch.triu_indices(b, b, 1)``):

    exact (use_cayley_neumann=false):   R = (I - Q)(I + Q)^-1
    Neumann (PEFT's default, k terms):  R = I + 2Q                                           (k = 2)
                                        R = I + 2 (Q + Q^2 + ... + Q^m) + Q^(m+1),  m = max(2, k - 2)   (k >= 3)

(k = 1 gives R = I. The series is that of (I + Q)(I - Q)^-1, the exact form's inverse, i.e. the rotation by -Q: the
two settings are different parametrisations of the same set, as in PEFT; its last term has weight 1 since PEFT 0.18.)
COFT projects each block's Q onto the Frobenius ball of radius eps / sqrt(n) before use.
"""

from __future__ import annotations

import math

import torch


def nearest_divisor(n: int, value: int) -> int:
    """The divisor of ``n`` nearest ``value`` (ties: the smaller one); ``n`` itself when ``value >= n`` (PEFT's
    ``adjust_oft_parameters``)."""
    if value >= n:
        return n
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - value), d))


def block_layout(in_features: int, r: int, block_size: int) -> tuple[int, int]:
    """(n blocks, block size b) of a layer with ``in_features`` inputs, n b = d_in, from the config's ``r`` or
    ``oft_block_size`` (the other 0); a value that does not divide d_in becomes its nearest divisor, as in PEFT."""
    if r == 0:
        b = block_size if in_features % block_size == 0 else nearest_divisor(in_features, block_size)
        return in_features // b, b
    n = r if in_features % r == 0 else nearest_divisor(in_features, r)
    return n, in_features // n


def n_elements(block_size: int) -> int:
    """b(b-1)/2: the trained values of one block (the strict upper triangle of Q)."""
    return block_size * (block_size - 1) // 2


def skew_symmetric(upper: torch.Tensor, block_size: int) -> torch.Tensor:
    """Q = U - U^T: (n, b(b-1)/2) -> (n, b, b)."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=upper.device)
    u = upper.new_zeros(upper.shape[0], block_size, block_size)
    u[:, rows, cols] = upper
    return u - u.transpose(-2, -1)


def cayley(q: torch.Tensor, neumann_terms: int | None) -> torch.Tensor:
    """The rotations of skew-symmetric blocks q (n, b, b): exact when ``neumann_terms`` is None, else the series of
    the module docstring (PEFT 0.21.2's ``_cayley_batch``)."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if neumann_terms is None:
        return torch.linalg.solve(eye + q, eye - q, left=False)  # X (I + Q) = I - Q
    r = eye.clone()
    if neumann_terms > 1:
        r = r + 2.0 * q
    if neumann_terms > 2:
        power = q @ q
        r = r + 2.0 * power
        for _ in range(3, neumann_terms - 1):
            power = power @ q
            r = r + 2.0 * power
        r = r + power @ q
    return r


@torch.no_grad()
def project_to_ball(upper: torch.Tensor, eps: float) -> torch.Tensor:
    """COFT's projection of each block's Q = U - U^T onto ||Q||_F <= eps / sqrt(n) (n = blocks held): (n, m)."""
    radius = eps / math.sqrt(upper.shape[0])
    norm = math.sqrt(2.0) * torch.linalg.vector_norm(upper, dim=1, keepdim=True)  # ||U - U^T||_F
    return torch.where(norm <= radius, upper, radius * upper / norm)


def drop_blocks(rotations: torch.Tensor, p: float) -> torch.Tensor:
    """Replace int(p n) of the n blocks (n, b, b), drawn at random, by the identity (PEFT's multiplicative dropout;
    nothing when one block is shared)."""
    n = rotations.shape[0]
    k = int(p * n)
    if n == 1 or k == 0:
        return rotations
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[torch.randperm(n)[:k]] = True
    eye = torch.eye(rotations.shape[-1], device=rotations.device, dtype=rotations.dtype)
    return torch.where(dropped.to(rotations.device).view(n, 1, 1), eye, rotations)
