"""How LoKr splits a layer into Kronecker factors: PEFT 0.21.2's ``factorization`` and its full-or-factored rule,
shared by the layer and the count so both follow one rule."""

from __future__ import annotations

from dataclasses import dataclass


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m n = ``dimension`` and m <= n: (factor, dimension / factor) when factor > 0 divides it, else
    the last divisor pair met walking m up from 1 while m < n and m <= ``factor`` (-1: no bound), as PEFT's
    ``lokr.layer.factorization``; e.g. 256 -> (16, 16), 128 -> (8, 16), 127 -> (1, 127)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n  # fixed, as in PEFT: the walk stops at the square root or at ``factor``
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@dataclass(frozen=True)
class KronShape:
    """Delta W (d_out, d_in) = kron(W1 (l, m), W2 (k, n)), d_out = l k, d_in = m n; which factors are low-rank."""

    l: int  # noqa: E741  (PEFT's and the paper's names)
    k: int
    m: int
    n: int
    factor_w1: bool
    factor_w2: bool

    def count(self, r: int) -> int:
        """Trainable numbers: each factor in full, or r (rows + columns) when factored."""
        w1 = r * (self.l + self.m) if self.factor_w1 else self.l * self.m
        w2 = r * (self.k + self.n) if self.factor_w2 else self.k * self.n
        return w1 + w2


def kron_shape(d_out: int, d_in: int, r: int, decompose_factor: int, decompose_both: bool) -> KronShape:
    """PEFT's rule for ``nn.Linear``: W2 factored when r < max(k, n) / 2; W1 only with ``decompose_both`` and
    r < max(l, m) / 2."""
    m, n = factorization(d_in, decompose_factor)
    l, k = factorization(d_out, decompose_factor)  # noqa: E741
    return KronShape(l, k, m, n, factor_w1=decompose_both and r < max(l, m) / 2, factor_w2=r < max(k, n) / 2)
