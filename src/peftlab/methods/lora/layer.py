"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A frozen linear layer y = x W^T + b gets a trainable low-rank update on (some of) its output columns:

    y[..., s:e] += scaling * dropout(x) A^T B^T        A: (r, d_in)  kaiming-uniform,  B: (e - s, r)  zeros

so the model is unchanged at step 0; scaling = alpha / r (or alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023).
Merging folds the update into W: W[s:e] += scaling * B A (for GPT-2's Conv1D, whose weight is (d_in, d_out),
W[:, s:e] += scaling * (B A)^T).

DoRA (Weight-Decomposed Low-Rank Adaptation, Liu et al. 2024, https://arxiv.org/abs/2402.09353) splits the
adapted weight V = W + scaling * B A (rows = output features, (e - s, d_in)) into a magnitude and a direction:

    y[..., s:e] = m / ||V||_row * (x V^T) + b[s:e]          m: (e - s,) trainable, init ||W[s:e]||_row

||V||_row is the L2 norm of each output feature's weight vector (PEFT's ``get_weight_norm``: norm over dim 1 of
the (out, in) weight, so over the rows of Conv1D's transposed (in, out) weight), recomputed every forward but
detached from the graph (paper section 4.3, as PEFT). At init B = 0 and m = ||W||, so the factor is exactly 1.
The forward adds to the base output y0 = x W^T + b, as PEFT does (f = m / ||V||):

    y = y0 + (f - 1) * (y0 - b) + f * scaling * x A^T B^T       (with active dropout: (y0 - b) -> dropout(x) W^T)

Merging writes W[s:e] <- f * (W[s:e] + scaling * B A); unmerging divides by the f saved at merge time.
Each GPT-2 q/k/v slice has its own magnitude over its own output columns (one output feature never mixes with
another, so slices are exact; a slice DoRA equals a whole-c_attn DoRA whose untouched columns keep m = ||W||).

PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948) and OLoRA (Buyukakyuz 2024,
https://arxiv.org/abs/2406.01775) start the branch at the top of W instead of at zero, and move that part out of
the frozen weight, so the output is still unchanged at step 0 (W rows: (e - s, d_in), as PEFT computes them):

    pissa:  W = U S V^T,  A0 = sqrt(S_r / s) V_r^T  (r, d_in),  B0 = U_r sqrt(S_r / s)  (e - s, r)
    olora:  W = Q R,      A0 = R[:r]  (r, d_in),                 B0 = Q[:, :r]  (e - s, r)
    base:   W <- W - s B0 A0

The factors are a function of the untouched W alone, so loading recomputes them from the base; (A0, B0) are kept
so the adapter converts to a plain LoRA on the untouched base: W + s (B A - B0 A0) = [B, -B0] [A; A0] s.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.methods.wrapped_linear import WHOLE, SlicedLinearWrapper

__all__ = ["WHOLE", "LoraLinear"]


class LoraLinear(SlicedLinearWrapper):
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
        use_dora: add a DoRA magnitude vector per branch (see the module docstring).
        init: ``default``, ``pissa`` or ``olora`` (see the module docstring; the latter two rewrite the base rows).
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
        use_dora: bool = False,
        init: str = "default",
    ) -> None:
        super().__init__(base_layer, slices, fan_in_fan_out)
        self.r = r
        self.scaling = scaling
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base_layer.weight
        dtype = self.trainable_dtype
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for key, (start, stop) in self.slices.items():
            a = torch.empty(r, in_features, dtype=dtype, device=w.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's (and nn.Linear's) default init
            self.lora_A[key] = nn.Parameter(a)
            self.lora_B[key] = nn.Parameter(torch.zeros(stop - start, r, dtype=dtype, device=w.device))
        self.use_dora = use_dora
        # DoRA magnitude per branch (PEFT's ``lora_magnitude_vector``); empty for plain LoRA.
        self.lora_magnitude_vector = nn.ParameterDict()
        self._merge_factors: dict[str, torch.Tensor] = {}  # DoRA's f at merge time, for an exact unmerge
        self.init = init
        self.initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # PiSSA / OLoRA (A0, B0) per branch
        if init != "default":
            for key in self.slices:
                self._principal_init(key, init)
        if use_dora:
            for key in self.slices:
                self.lora_magnitude_vector[key] = nn.Parameter(self.weight_norm(key).to(dtype))

    @torch.no_grad()
    def _principal_init(self, key: str, init: str) -> None:
        """PiSSA / OLoRA: A0, B0 from the branch's rows of W, and those rows <- W - s B0 A0 (module docstring)."""
        rows = self.base_rows(key)  # (e - s, d_in), a view of the base weight
        w = rows.to(torch.float32)
        if self.r > min(w.shape):
            raise ValueError(f"init={init} needs r <= min(d_out, d_in) = {min(w.shape)}, got r={self.r}")
        if init == "pissa":
            u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
            root = (sigma[:self.r] / self.scaling).sqrt()
            a, b = root[:, None] * vh[:self.r], u[:, :self.r] * root[None, :]
        else:
            q, upper = torch.linalg.qr(w)
            a, b = upper[:self.r], q[:, :self.r]
        self.lora_A[key].copy_(a)
        self.lora_B[key].copy_(b)
        self.initial[key] = (a.clone(), b.clone())
        rows.copy_((w - self.scaling * b @ a).to(rows.dtype))

    def plain_lora(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of a plain LoRA on the untouched base computing this branch's update: rank 2r [A; A0], [B, -B0]
        after PiSSA / OLoRA (the detached weights), (A, B) themselves otherwise."""
        if key not in self.initial:
            return self.lora_A[key], self.lora_B[key]
        a0, b0 = self.initial[key]
        return (torch.cat([self.lora_A[key].detach(), a0.to(self.lora_A[key].dtype)]),
                torch.cat([self.lora_B[key].detach(), -b0.to(self.lora_B[key].dtype)], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # x: (..., d_in) -> (..., d_out)
        if self.merged:
            return out
        first = next(iter(self.lora_A.values()))
        h = self.dropout(x).to(first.dtype)  # one dropout mask shared by the branches, on the LoRA input only
        for key, (start, stop) in self.slices.items():
            # (..., d_in) -> (..., r) -> (..., stop - start): two thin matmuls; B A is never formed here.
            delta = F.linear(F.linear(h, self.lora_A[key]), self.lora_B[key]) * self.scaling
            if self.use_dora:
                delta = self._dora_delta(key, h, out[..., start:stop], delta)
            out = self.add_to_slice(out, key, delta)
        return out

    @torch.no_grad()
    def weight_norm(self, key: str) -> torch.Tensor:
        """||W[s:e] + scaling * B A||_row: (stop - start,), detached (DoRA treats it as a constant)."""
        a = self.lora_A[key]
        rows = self.base_rows(key).to(a.dtype) + self.scaling * (self.lora_B[key] @ a)
        return torch.linalg.norm(rows, dim=1)

    def _dora_delta(self, key: str, h: torch.Tensor, base_out: torch.Tensor, lora_out: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to one branch's base output: (f - 1) * (x W^T) + f * lora_out, f = m / ||V||_row."""
        factor = self.lora_magnitude_vector[key] / self.weight_norm(key)  # (stop - start,)
        if self.training and isinstance(self.dropout, nn.Dropout):
            plain = F.linear(h, self.base_rows(key).to(h.dtype))  # PEFT: the base term sees the dropped input too
        else:
            bias = self.base_layer.bias
            start, stop = self.slices[key]
            plain = base_out - bias[start:stop] if bias is not None else base_out.clone()  # clone: out is edited
        return (factor - 1) * plain.to(factor.dtype) + factor * lora_out

    def delta_weight(self, key: str) -> torch.Tensor:
        """scaling * B A for one branch, laid out like the base weight's slice ((out, in), or (in, out) for Conv1D)."""
        delta = (self.lora_B[key] @ self.lora_A[key]) * self.scaling  # (stop - start, d_in)
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every branch (and DoRA's factor) into the base weight; forward then skips the low-rank path."""
        if not self.merged:
            if self.use_dora:
                self._merge_dora()
            else:
                self._add_delta(sign=1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: subtract the update (DoRA: after dividing by the saved factor); exact up to rounding."""
        if self.merged:
            if self.use_dora:
                self._unmerge_dora()
            else:
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

    def _merge_dora(self) -> None:
        for key in self.slices:
            # f from the unmerged weight, as forward computes it; saved because the merged W no longer gives it.
            factor = self.lora_magnitude_vector[key].detach() / self.weight_norm(key)
            self._merge_factors[key] = factor
            rows = self.base_rows(key)
            rows.copy_((factor[:, None] * (rows.to(factor.dtype) + self.scaling * self.lora_B[key] @ self.lora_A[key]))
                       .to(rows.dtype))

    def _unmerge_dora(self) -> None:
        for key in self.slices:
            factor = self._merge_factors.pop(key)
            rows = self.base_rows(key)
            update = self.scaling * self.lora_B[key] @ self.lora_A[key]
            rows.copy_((rows.to(factor.dtype) / factor[:, None] - update).to(rows.dtype))

    def extra_repr(self) -> str:
        parts = ", ".join(f"{k}[{a}:{b}]" for k, (a, b) in self.slices.items())
        dora = ", dora=True" if self.use_dora else ""
        init = f", init={self.init}" if self.init != "default" else ""
        return f"r={self.r}, scaling={self.scaling:g}, slices=({parts}){dora}{init}, merged={self.merged}"
