"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A frozen linear layer y = x W^T + b gets a trainable low-rank update on (some of) its output columns:

    y[..., s:e] += scaling * dropout(x) A^T B^T        A: (r, d_in)  kaiming-uniform,  B: (e - s, r)  zeros

so the model is unchanged at step 0; scaling = alpha / r (or alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023).
Merging folds the update into W: W[s:e] += scaling * B A (for GPT-2's Conv1D, whose weight is (d_in, d_out),
W[:, s:e] += scaling * (B A)^T).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Branch key of an update that covers all output columns: ``<module>.lora_A.weight`` is PEFT's key layout too.
WHOLE = "weight"


class LoraLinear(nn.Module):
    """Wraps (never subclasses) an ``nn.Linear`` or GPT-2 ``Conv1D`` and adds one LoRA branch per output slice.

    Args:
        base_layer: the frozen layer; kept as ``self.base_layer``.
        slices: branch key -> (start, stop) output columns. ``{"weight": (0, d_out)}`` adapts the whole layer;
            ``{"q": (0, d), "v": (2d, 3d)}`` adapts two slices of GPT-2's fused ``c_attn`` with separate A and B.
        in_features: d_in of the base layer.
        fan_in_fan_out: True when the base weight is stored (d_in, d_out) (``Conv1D``).
        r: rank.
        scaling: multiplier of the update (alpha / r or alpha / sqrt(r)).
        dropout: dropout probability on the branch input.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        slices: dict[str, tuple[int, int]],
        in_features: int,
        fan_in_fan_out: bool,
        r: int,
        scaling: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slices = dict(slices)
        self.fan_in_fan_out = fan_in_fan_out
        self.r = r
        self.scaling = scaling
        self.merged = False
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base_layer.weight
        # Half-precision bases get float32 adapters (as PEFT's autocast_adapter_dtype): tiny updates survive.
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for key, (start, stop) in self.slices.items():
            a = torch.empty(r, in_features, dtype=dtype, device=w.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's (and nn.Linear's) default init
            self.lora_A[key] = nn.Parameter(a)
            self.lora_B[key] = nn.Parameter(torch.zeros(stop - start, r, dtype=dtype, device=w.device))

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (code that reads ``layer.weight.dtype`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def whole(self) -> bool:
        """True when one branch covers every output column."""
        return list(self.slices) == [WHOLE]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # x: (..., d_in) -> (..., d_out)
        if self.merged:
            return out
        first = next(iter(self.lora_A.values()))
        h = self.dropout(x).to(first.dtype)  # one dropout mask shared by the branches, on the LoRA input only
        for key, (start, stop) in self.slices.items():
            # (..., d_in) -> (..., r) -> (..., stop - start): two thin matmuls; B A is never formed here.
            delta = F.linear(F.linear(h, self.lora_A[key]), self.lora_B[key]) * self.scaling
            if self.whole:
                out = out + delta.to(out.dtype)
            else:
                out[..., start:stop] += delta.to(out.dtype)
        return out

    def delta_weight(self, key: str) -> torch.Tensor:
        """scaling * B A for one branch, laid out like the base weight's slice ((out, in), or (in, out) for Conv1D)."""
        delta = (self.lora_B[key] @ self.lora_A[key]) * self.scaling  # (stop - start, d_in)
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every branch into the base weight; forward then skips the low-rank path."""
        if not self.merged:
            self._add_delta(sign=1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged update again (exact up to float rounding)."""
        if self.merged:
            self._add_delta(sign=-1.0)
            self.merged = False

    def _add_delta(self, sign: float) -> None:
        w = self.base_layer.weight
        for key, (start, stop) in self.slices.items():
            delta = (sign * self.delta_weight(key)).to(w.dtype)
            if self.fan_in_fan_out:
                w[:, start:stop] += delta  # Conv1D weight: (d_in, d_out)
            else:
                w[start:stop, :] += delta  # nn.Linear weight: (d_out, d_in)

    def extra_repr(self) -> str:
        parts = ", ".join(f"{k}[{a}:{b}]" for k, (a, b) in self.slices.items())
        return f"r={self.r}, scaling={self.scaling:g}, slices=({parts}), merged={self.merged}"
