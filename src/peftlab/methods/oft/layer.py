"""OFT: Orthogonal Finetuning (Qiu et al. 2023, https://arxiv.org/abs/2306.07280), as Hugging Face PEFT 0.21.2's
``OFTConfig`` parametrises it.

A frozen linear layer y = x W^T + b keeps its weights and rotates its input side by a trained block-diagonal
orthogonal matrix R = diag(R_1, ..., R_n) (n b = d_in; :mod:`.blocks` for R_i = Cayley(Q_i)):

    y = (x R) W^T + b = x (W R^T)^T + b     # x: (..., d_in) -> (..., n, b) x (n, b, b) -> (..., d_in) -> (..., d_out)

so the rows of W turn by R^T: their norms and the angles between them, the "hyperspherical energy", are kept.
Q = 0 (PEFT's init) gives R = I: the base layer. A GPT-2 ``Conv1D`` slice (q / k / v of ``c_attn``) rotates the input
of its own output columns only. Merging writes W R^T - W into the weight (:class:`DenseDeltaWrapper` keeps that delta
for an exact unmerge).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.methods.oft.blocks import cayley, drop_blocks, n_elements, project_to_ball, skew_symmetric
from peftlab.methods.wrapped_linear import WHOLE, DenseDeltaWrapper

__all__ = ["WHOLE", "OftLinear"]


class OftLinear(DenseDeltaWrapper):
    """Wraps (never subclasses) an ``nn.Linear`` or GPT-2 ``Conv1D``; one rotation per output slice.

    Args:
        base_layer: the frozen layer; kept as ``self.base_layer``.
        slices: branch key -> (start, stop) output columns (``{"weight": (0, d_out)}`` for the whole layer).
        fan_in_fan_out: True when the base weight is stored (d_in, d_out) (``Conv1D``).
        n_blocks: n, with n * block_size = d_in.
        block_size: b.
        block_share: one trained block for all n positions.
        coft: project Q onto the COFT ball (radius ``eps / sqrt(blocks held)``) before every use, in place.
        eps: COFT's radius.
        neumann_terms: terms of the Cayley-Neumann series, or None for the exact Cayley transform.
        module_dropout: fraction of blocks set to the identity at each training forward.
    """

    def __init__(self, base_layer: nn.Module, slices: dict[str, tuple[int, int]], fan_in_fan_out: bool,
                 n_blocks: int, block_size: int, block_share: bool = False, coft: bool = False, eps: float = 6e-5,
                 neumann_terms: int | None = 5, module_dropout: float = 0.0) -> None:
        super().__init__(base_layer, slices, fan_in_fan_out)
        self.n_blocks, self.block_size, self.block_share = n_blocks, block_size, block_share
        self.coft, self.eps, self.neumann_terms, self.module_dropout = coft, eps, neumann_terms, module_dropout
        self.oft_R = nn.ParameterDict()  # key ``weight`` for the whole layer: PEFT's ``<module>.oft_R.weight``
        for key in self.slices:  # (n or 1, b(b-1)/2), zeros: R = I
            self.oft_R[key] = self.new_parameter((1 if block_share else n_blocks, n_elements(block_size)), zero=True)

    def rotations(self, key: str, dropout: bool = False) -> torch.Tensor:
        """The blocks R_1..R_n of branch ``key``: (n, b, b) in the trainable dtype (COFT projects Q in place first;
        ``dropout``: module dropout while training)."""
        upper = self.oft_R[key]
        if self.coft:
            with torch.no_grad():
                upper.copy_(project_to_ball(upper, self.eps))
        rotations = cayley(skew_symmetric(upper, self.block_size), self.neumann_terms)  # (n or 1, b, b)
        if dropout and self.module_dropout > 0:
            rotations = drop_blocks(rotations, self.module_dropout)
        return rotations.expand(self.n_blocks, -1, -1) if self.block_share else rotations

    def rotate(self, x: torch.Tensor, key: str) -> torch.Tensor:
        """x R: (..., d_in) -> (..., d_in), computed in the trainable dtype and returned in x's."""
        r = self.rotations(key, dropout=self.training)
        blocks = x.to(r.dtype).reshape(*x.shape[:-1], self.n_blocks, self.block_size)  # (..., n, b)
        return torch.einsum("...nk,nkc->...nc", blocks, r).reshape(x.shape).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.whole:
            return self.base_layer(self.rotate(x, WHOLE))
        out = self.base_layer(x)  # (..., d_out); each adapted slice is recomputed from its own rotated input
        bias = self.base_layer.bias
        for key, (start, stop) in self.slices.items():
            rows = self.base_rows(key)  # (stop - start, d_in)
            out[..., start:stop] = F.linear(self.rotate(x, key), rows, None if bias is None else bias[start:stop])
        return out

    def delta_rows(self, key: str) -> torch.Tensor:
        """W R^T - W for branch ``key``'s rows W (stop - start, d_in): the merge's update (no module dropout)."""
        r = self.rotations(key)
        rows = self.base_rows(key).to(r.dtype)
        blocks = rows.reshape(rows.shape[0], self.n_blocks, self.block_size)  # (o, n, b)
        return torch.einsum("onk,nck->onc", blocks, r).reshape(rows.shape) - rows  # (W R^T)[o, (n, c)]

    def extra_repr(self) -> str:
        parts = ", ".join(f"{k}[{a}:{b}]" for k, (a, b) in self.slices.items())
        return (f"blocks={self.n_blocks}x{self.block_size}, block_share={self.block_share}, coft={self.coft}, "
                f"slices=({parts}), merged={self.merged}")
