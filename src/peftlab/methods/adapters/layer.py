"""Bottleneck adapters (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751; Pfeiffer et al. 2020,
https://arxiv.org/abs/2005.00247; parallel / scaled parallel: He et al. 2022, https://arxiv.org/abs/2110.04366).

One adapter is a small residual-free MLP on the hidden states:

    A(h) = s * (act(h W_down^T + b_down) W_up^T + b_up)     W_down: (b, d) kaiming-uniform,  W_up: (d, b) zeros

so A = 0 and the model is unchanged at step 0 (all biases start at zero too). A wraps a whole sub-layer f (the
attention module or the feed-forward module of a block, whose output the block adds to the residual stream):

    sequential (Houlsby, Pfeiffer):  f'(x) = f(x) + A(f(x))     # h (B, T, d) -> (B, T, b) -> (B, T, d)
    parallel (He et al.):            f'(x) = f(x) + A(x)        # x: the sub-layer input (the normed hidden states)

Dropout (He et al.'s implementation) acts on the bottleneck activations only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """A(h) = scaling * up(dropout(act(down(h)))); ``up`` is zero-initialised.

    Args:
        hidden_size: d, the width of the input and output.
        bottleneck_size: b.
        non_linearity: a key of :data:`ACTIVATIONS`.
        scaling: s.
        dropout: dropout probability on the (B, T, b) activations.
        device: where the weights live.
        dtype: dtype of the weights.
    """

    def __init__(self, hidden_size: int, bottleneck_size: int, non_linearity: str = "relu", scaling: float = 1.0,
                 dropout: float = 0.0, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck_size, device=device, dtype=dtype)  # kaiming-uniform weight
        self.act = ACTIVATIONS[non_linearity]()
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(bottleneck_size, hidden_size, device=device, dtype=dtype)
        self.scaling = scaling
        self.non_linearity = non_linearity
        with torch.no_grad():
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: (..., d) -> (..., b) -> (..., d), computed in the adapter's dtype and returned in h's.
        out = self.up(self.dropout(self.act(self.down(h.to(self.down.weight.dtype)))))
        return (out * self.scaling).to(h.dtype)

    def extra_repr(self) -> str:
        return f"scaling={self.scaling:g}"


class AdaptedSublayer(nn.Module):
    """Wraps (never subclasses) a block's sub-layer and adds a :class:`BottleneckAdapter` to its output.

    The sub-layer may return a tensor (feed-forward modules) or a tuple whose first item is the output (attention
    modules return ``(output, weights)``); the other items pass through. Attributes the wrapper lacks are read from
    the wrapped module (e.g. ``layer_idx``), so code that inspects the block still finds them.

    Args:
        base_layer: the frozen sub-layer; kept as ``self.base_layer``.
        adapter: the trainable adapter.
        parallel: True: add ``adapter(input)`` (He et al.); False: add ``adapter(output)`` (Houlsby, Pfeiffer).
    """

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter, parallel: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.parallel = parallel

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":  # not set yet (inside __init__): avoid infinite recursion
                raise
            return getattr(self.base_layer, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out  # (B, T, d)
        delta = self.adapter(sublayer_input(args, kwargs) if self.parallel else y)
        y = y + delta
        return (y, *out[1:]) if isinstance(out, tuple) else y

    def extra_repr(self) -> str:
        return f"parallel={self.parallel}"


def sublayer_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a sub-layer was called with: the first positional argument, or ``hidden_states=`` (Llama
    attention) / ``x=`` (Llama MLP) by keyword."""
    if args:
        return args[0]
    for key in ("hidden_states", "x"):
        if key in kwargs:
            return kwargs[key]
    raise TypeError(f"cannot find the sub-layer input among keyword arguments {sorted(kwargs)}")
