"""(IA)^3: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022,
https://arxiv.org/abs/2205.05638).

A frozen linear layer y = x W^T + b gets one learned vector that rescales either its output or its input:

    output (keys, values):   y[..., s:e] = l * (x W^T + b)[..., s:e]      l: (e - s,)   stored (e - s, 1)
    input  (FFN down proj):  y = (l * x) W^T + b                          l: (d_in,)    stored (1, d_in)

with l initialised to ones, so the model is unchanged at step 0. The stored shapes are PEFT's (``ia3_l``), so a
PEFT adapter file loads as is. Merging folds l into the weight: output scaling multiplies the weight rows
(W[s:e, :] *= l, and b[s:e] *= l), input scaling multiplies the weight columns (W[:, j] *= l_j; b unchanged).
GPT-2's ``Conv1D`` stores W transposed, (d_in, d_out), so rows and columns swap there.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from peftlab.methods.wrapped_linear import WHOLE, SlicedLinearWrapper

__all__ = ["WHOLE", "IA3Linear"]


class IA3Linear(SlicedLinearWrapper):
    """Wraps (never subclasses) an ``nn.Linear`` or GPT-2 ``Conv1D`` and rescales its input or output.

    Args:
        base_layer: the frozen layer; kept as ``self.base_layer``.
        slices: branch key -> (start, stop) output columns to rescale (``{"weight": (0, d_out)}``: all of them;
            ``{"k": (d, 2d), "v": (2d, 3d)}``: two slices of GPT-2's fused ``c_attn``). Ignored when ``feedforward``.
        in_features: d_in of the base layer.
        fan_in_fan_out: True when the base weight is stored (d_in, d_out) (``Conv1D``).
        feedforward: rescale the input (one (1, d_in) vector) instead of the output.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        slices: dict[str, tuple[int, int]],
        in_features: int,
        fan_in_fan_out: bool,
        feedforward: bool,
    ) -> None:
        super().__init__(base_layer, {WHOLE: (0, in_features)} if feedforward else slices, fan_in_fan_out)
        self.feedforward = feedforward
        self.out_features = base_layer.weight.shape[1 if fan_in_fan_out else 0]
        w = base_layer.weight
        dtype = self.trainable_dtype
        self.ia3_l = nn.ParameterDict()
        for key, (start, stop) in self.slices.items():
            shape = (1, stop - start) if feedforward else (stop - start, 1)
            self.ia3_l[key] = nn.Parameter(torch.ones(shape, dtype=dtype, device=w.device))

    def output_scale(self) -> torch.Tensor:
        """The (d_out,) output multiplier: the learned vectors on their slices, ones elsewhere (differentiable)."""
        first = next(iter(self.ia3_l.values()))
        pieces, pos = [], 0
        for key, (start, stop) in sorted(self.slices.items(), key=lambda kv: kv[1]):
            pieces += [first.new_ones(start - pos), self.ia3_l[key].flatten()]
            pos = stop
        pieces.append(first.new_ones(self.out_features - pos))
        return torch.cat(pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.feedforward:
            scale = self.ia3_l[WHOLE].flatten()  # (d_in,)
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))  # (..., d_in) -> (..., d_out)
        out = self.base_layer(x)  # (..., d_out)
        scale = self.ia3_l[WHOLE].flatten() if self.whole else self.output_scale()
        return (out * scale).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the vectors into the base weight (and bias, for output scaling); forward then skips them."""
        if self.merged:
            return
        # Division by l undoes the merge to within float rounding for any l except 0 (the weight is gone).
        if any(bool((p == 0).any()) for p in self.ia3_l.values()):
            warnings.warn("an IA3 scale is exactly 0: unmerge() cannot restore the weights it multiplies",
                          stacklevel=2)
        self._rescale(invert=False)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide the merged vectors out again (exact up to float rounding while no scale is 0)."""
        if self.merged:
            self._rescale(invert=True)
            self.merged = False

    def _rescale(self, invert: bool) -> None:
        w, b = self.base_layer.weight, self.base_layer.bias
        for key, (start, stop) in self.slices.items():
            vec = self.ia3_l[key].flatten().to(torch.float32)
            op = torch.div if invert else torch.mul
            # Rows of W (out, in) for output scaling, columns for input scaling; Conv1D's (in, out) swaps them.
            if self.feedforward == self.fan_in_fan_out:
                w[start:stop, :] = op(w[start:stop, :].float(), vec[:, None]).to(w.dtype)
            else:
                w[:, start:stop] = op(w[:, start:stop].float(), vec[None, :]).to(w.dtype)
            if not self.feedforward and b is not None:
                b[start:stop] = op(b[start:stop].float(), vec).to(b.dtype)

    def extra_repr(self) -> str:
        if self.feedforward:
            return f"scales=input, merged={self.merged}"
        parts = ", ".join(f"{k}[{a}:{b}]" for k, (a, b) in self.slices.items())
        return f"scales=output({parts}), merged={self.merged}"
