"""LoKr: low-rank Kronecker product (Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS
Fine-Tuning to Model Evaluation", https://arxiv.org/abs/2309.14859; PEFT's ``LoKrConfig``).

A frozen linear layer y = x W^T + b (rows [s:e] of one branch: d_out = e - s) gets the update

    Delta W[s:e] = (alpha / r) kron(W1, W2)        W1: (l, m)   W2: (k, n)   d_out = l k,  d_in = m n

with (l, k) and (m, n) divisor pairs of d_out and d_in nearest their square roots (:mod:`.factors`). W2 is trained
as W2a (k, r) W2b (r, n) when r < max(k, n) / 2, else in full; W1 in full, or as W1a (l, r) W1b (r, m) with
decompose_both. Init as PEFT: W1 (or W1a) = 0, so the model is unchanged at step 0; the others kaiming-uniform.
The delta is dense: y[..., s:e] += x Delta W^T; merging adds it to W.
"""

from __future__ import annotations

import torch
from torch import nn

from peftlab.methods.lokr.factors import KronShape
from peftlab.methods.wrapped_linear import WHOLE, DenseDeltaWrapper

__all__ = ["FACTORS", "WHOLE", "LokrLinear"]

# PEFT's parameter names; a branch holds lokr_w1 or (lokr_w1_a, lokr_w1_b), and lokr_w2 or (lokr_w2_a, lokr_w2_b).
FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


class LokrLinear(DenseDeltaWrapper):
    """Wraps (never subclasses) an ``nn.Linear`` or GPT-2 ``Conv1D`` and adds one LoKr branch per output slice.

    Args:
        base_layer, slices, fan_in_fan_out: the wrapped layer, as
            :class:`~peftlab.methods.wrapped_linear.SlicedLinearWrapper` takes them.
        shapes: branch key -> its :class:`KronShape`.
        r: rank of the factored factors.
        scaling: alpha / r.
    """

    def __init__(self, base_layer: nn.Module, slices: dict[str, tuple[int, int]], shapes: dict[str, KronShape],
                 fan_in_fan_out: bool, r: int, scaling: float) -> None:
        super().__init__(base_layer, slices, fan_in_fan_out)
        self.r, self.scaling = r, scaling
        for name in FACTORS:
            setattr(self, name, nn.ParameterDict())
        for key, s in shapes.items():
            w1 = {"lokr_w1_a": (s.l, r), "lokr_w1_b": (r, s.m)} if s.factor_w1 else {"lokr_w1": (s.l, s.m)}
            w2 = {"lokr_w2_a": (s.k, r), "lokr_w2_b": (r, s.n)} if s.factor_w2 else {"lokr_w2": (s.k, s.n)}
            for name, shape in {**w1, **w2}.items():  # PEFT's init: W1 (or W1a) = 0, the rest kaiming-uniform
                getattr(self, name)[key] = self.new_parameter(shape, zero=name in ("lokr_w1", "lokr_w1_a"))

    def _factor(self, key: str, which: str) -> torch.Tensor:
        full = getattr(self, f"lokr_{which}")
        if key in full:
            return full[key]
        return getattr(self, f"lokr_{which}_a")[key] @ getattr(self, f"lokr_{which}_b")[key]

    def delta_rows(self, key: str) -> torch.Tensor:
        """(alpha / r) kron(W1, W2): (stop - start, d_in)."""
        return torch.kron(self._factor(key, "w1"), self._factor(key, "w2").contiguous()) * self.scaling

    def extra_repr(self) -> str:
        parts = ", ".join(f"{k}[{a}:{b}]" for k, (a, b) in self.slices.items())
        return f"r={self.r}, scaling={self.scaling:g}, slices=({parts}), merged={self.merged}"
