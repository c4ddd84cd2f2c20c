"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al. 2024, https://arxiv.org/abs/2310.11454).

One pair of frozen random matrices is shared by every adapted layer; each layer trains only two vectors:

    y[..., s:e] += lambda_b * (B[s:e] (lambda_d * (A[:, :d_in] x)))
    A: (r, max d_in)  B: (max d_out, r)  shared, frozen, kaiming-uniform from one seeded generator
    lambda_d: (r,) init d_initial   lambda_b: (e - s,) init 0, so the model is unchanged at step 0

A layer uses the top-left corner of the shared matrices (A[:, :d_in], B[:d_out]), as PEFT does; an output slice
[s:e] of GPT-2's fused ``c_attn`` uses the rows B[s:e] it would use as part of the whole layer and shares the
layer's lambda_d (one r-vector per wrapped module), so a sliced VeRA is exactly a whole-layer VeRA whose lambda_b
is 0 on the untouched columns. Merging adds the (linear) update to W: W[s:e] += diag(lambda_b) B[s:e] diag(lambda_d)
A[:, :d_in].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.methods.wrapped_linear import WHOLE, DenseDeltaWrapper

__all__ = ["WHOLE", "VeraLinear", "shared_projections"]


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's VeRA ``_kaiming_init``: U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def shared_projections(r: int, max_in: int, max_out: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen A (r, max_in) and B (max_out, r): one CPU generator seeded with ``key``, A drawn first,
    as PEFT's ``VeraModel._init_vera_A_vera_B`` (so the same key gives PEFT's matrices)."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    a = _kaiming_uniform((r, max_in), generator)
    return a, _kaiming_uniform((max_out, r), generator)


class VeraLinear(DenseDeltaWrapper):
    """Wraps (never subclasses) an ``nn.Linear`` or GPT-2 ``Conv1D`` and adds a VeRA branch (module docstring).

    Args:
        base_layer, slices, fan_in_fan_out: the wrapped layer, as
            :class:`~peftlab.methods.wrapped_linear.SlicedLinearWrapper` takes them.
        in_features: d_in of the base layer.
        projection_a: the shared A (r, max d_in); held as a non-persistent buffer (the model's state dict is the
            base model's).
        projection_b: the shared B (max d_out, r).
        d_initial: initial value of lambda_d.
        dropout: dropout probability on the branch input.
    """

    def __init__(self, base_layer: nn.Module, slices: dict[str, tuple[int, int]], in_features: int,
                 fan_in_fan_out: bool, projection_a: torch.Tensor, projection_b: torch.Tensor, d_initial: float,
                 dropout: float = 0.0) -> None:
        super().__init__(base_layer, slices, fan_in_fan_out)
        self.in_features = in_features
        dtype, device = self.trainable_dtype, base_layer.weight.device
        self.register_buffer("vera_A", projection_a, persistent=False)
        self.register_buffer("vera_B", projection_b, persistent=False)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.vera_lambda_d = nn.Parameter(torch.full((projection_a.shape[0],), float(d_initial), dtype=dtype,
                                                     device=device))
        self.vera_lambda_b = nn.ParameterDict(
            {key: nn.Parameter(torch.zeros(stop - start, dtype=dtype, device=device))
             for key, (start, stop) in self.slices.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two thin matmuls through the shared projections (the dense delta is formed only to merge)."""
        out = self.base_layer(x)  # x: (..., d_in) -> (..., d_out)
        if self.merged:
            return out
        d = self.vera_lambda_d
        h = d * F.linear(self.dropout(x).to(d.dtype), self.vera_A[:, :self.in_features])  # (..., r)
        for key, (start, stop) in self.slices.items():
            out = self.add_to_slice(out, key, self.vera_lambda_b[key] * F.linear(h, self.vera_B[start:stop]))
        return out

    def full_lambda_b(self) -> torch.Tensor:
        """lambda_b over all of the layer's outputs, (d_out,): the slices' vectors in place, zeros elsewhere
        (what a whole-layer VeRA computing the same update holds); detached."""
        if self.whole:
            return self.vera_lambda_b[WHOLE].detach()
        first = next(iter(self.vera_lambda_b.values()))
        full = first.new_zeros(self.base_layer.weight.shape[1 if self.fan_in_fan_out else 0])
        for key, (start, stop) in self.slices.items():
            full[start:stop] = self.vera_lambda_b[key].detach()
        return full

    def delta_rows(self, key: str) -> torch.Tensor:
        """diag(lambda_b) B[s:e] diag(lambda_d) A[:, :d_in]: (stop - start, d_in), the update of the branch's rows."""
        start, stop = self.slices[key]
        return ((self.vera_lambda_b[key][:, None] * self.vera_B[start:stop])
                @ (self.vera_lambda_d[:, None] * self.vera_A[:, :self.in_features]))

    def extra_repr(self) -> str:
        parts = ", ".join(f"{k}[{a}:{b}]" for k, (a, b) in self.slices.items())
        return f"r={self.vera_lambda_d.shape[0]}, slices=({parts}), merged={self.merged}"
