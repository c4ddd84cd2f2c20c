"""LoHa: low-rank Hadamard product (FedPara, Hyeon-Woo et al. 2022, https://arxiv.org/abs/2108.06098; as LyCORIS
and PEFT's ``LoHaConfig`` apply it to fine-tuning).

A frozen linear layer y = x W^T + b gets the update

    Delta W[s:e] = (alpha / r) (W1a W1b) * (W2a W2b)          (* elementwise)
    W1a, W2a: (e - s, r)   W1b, W2b: (r, d_in)   W1a, W1b, W2a kaiming-uniform, W2b = 0 (the base at step 0)

whose rank reaches r^2 with 2 r (d_out + d_in) parameters. The delta is formed densely (the Hadamard product has no
thin factorisation) and added to the branch's rows: y[..., s:e] += x Delta W[s:e]^T; merging adds it to W.
"""

from __future__ import annotations

import torch
from torch import nn

from peftlab.methods.wrapped_linear import WHOLE, DenseDeltaWrapper

__all__ = ["WHOLE", "LohaLinear"]

FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LohaLinear(DenseDeltaWrapper):
    """Wraps (never subclasses) an ``nn.Linear`` or GPT-2 ``Conv1D`` and adds one LoHa branch per output slice.

    Args:
        base_layer, slices, fan_in_fan_out: the wrapped layer, as
            :class:`~peftlab.methods.wrapped_linear.SlicedLinearWrapper` takes them.
        in_features: d_in of the base layer.
        r: rank of each factor.
        scaling: alpha / r.
    """

    def __init__(self, base_layer: nn.Module, slices: dict[str, tuple[int, int]], in_features: int,
                 fan_in_fan_out: bool, r: int, scaling: float) -> None:
        super().__init__(base_layer, slices, fan_in_fan_out)
        self.r, self.scaling = r, scaling
        self.hada_w1_a, self.hada_w1_b = nn.ParameterDict(), nn.ParameterDict()
        self.hada_w2_a, self.hada_w2_b = nn.ParameterDict(), nn.ParameterDict()
        for key, (start, stop) in self.slices.items():  # PEFT's init and order: kaiming-uniform, but W2b = 0
            self.hada_w1_a[key] = self.new_parameter((stop - start, r))
            self.hada_w1_b[key] = self.new_parameter((r, in_features))
            self.hada_w2_a[key] = self.new_parameter((stop - start, r))
            self.hada_w2_b[key] = self.new_parameter((r, in_features), zero=True)

    def delta_rows(self, key: str) -> torch.Tensor:
        """(alpha / r) (W1a W1b) * (W2a W2b): (stop - start, d_in)."""
        return (self.hada_w1_a[key] @ self.hada_w1_b[key]) * (self.hada_w2_a[key] @ self.hada_w2_b[key]) * self.scaling

    def extra_repr(self) -> str:
        parts = ", ".join(f"{k}[{a}:{b}]" for k, (a, b) in self.slices.items())
        return f"r={self.r}, scaling={self.scaling:g}, slices=({parts}), merged={self.merged}"
