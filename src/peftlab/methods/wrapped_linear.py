"""What every method that wraps a frozen ``nn.Linear`` / GPT-2 ``Conv1D`` column-slice by column-slice shares
(LoRA and IA3): the wrapped layer, its output slices, weight/bias pass-through and the trainable dtype."""

from __future__ import annotations

import torch
from torch import nn

# Branch key of a branch that covers the whole layer; ``<module>.<param>.weight``-style keys are PEFT's layout too.
WHOLE = "weight"


class SlicedLinearWrapper(nn.Module):
    """Base of a module that wraps (never subclasses) a frozen linear layer and adapts some of its output slices.

    Args:
        base_layer: the frozen layer; kept as ``self.base_layer``.
        slices: branch key -> (start, stop) output columns (``{WHOLE: (0, d_out)}`` for the whole layer).
        fan_in_fan_out: True when the base weight is stored (d_in, d_out) (``Conv1D``).
    """

    def __init__(self, base_layer: nn.Module, slices: dict[str, tuple[int, int]], fan_in_fan_out: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slices = dict(slices)
        self.fan_in_fan_out = fan_in_fan_out
        self.merged = False

    @property
    def trainable_dtype(self) -> torch.dtype:
        """float32 on half-precision bases (PEFT's autocast_adapter_dtype), else the base dtype."""
        w = self.base_layer.weight
        return torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (code that reads ``layer.weight.dtype`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def whole(self) -> bool:
        """True when one branch covers the whole layer."""
        return list(self.slices) == [WHOLE]
