"""Apply VeRA to a model: resolve the targets, draw the shared projections, wrap each target in :class:`VeraLinear`.

Trainable count = sum over adapted modules of r (lambda_d) + the targeted output width (lambda_b); the shared A and
B are frozen buffers, sized by the largest targeted module (max d_in, max d_out), as PEFT sizes them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftlab.methods.base import LayerwiseMergeable
from peftlab.methods.vera.config import VeraConfig
from peftlab.methods.vera.layer import VeraLinear, shared_projections
from peftlab.methods.wrapped_linear import MakeWrapper, apply_wrapped, branch_parameters, describe_layers
from peftlab.models.arch import TargetModule

# Keys of the shared projections in the saved adapter (save_projection); PEFT's are "base_model.vera_A" / "_B".
PROJECTION_KEYS = ("vera_A", "vera_B")


class VeraMethod(LayerwiseMergeable):
    """VeRA applied to one model; ``layers`` maps module path -> its :class:`VeraLinear`."""

    merge_label = "VeRA"

    config: VeraConfig
    layers: dict[str, VeraLinear]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """``<module>.vera_lambda_d`` (r,) and ``<module>.vera_lambda_b`` (d_out,) (PEFT's keys and shapes) or
        ``<module>.vera_lambda_b.<slice>`` for an output slice."""
        return branch_parameters(self.layers, ["vera_lambda_b"], per_layer=["vera_lambda_d"])

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared (A, B), as every layer holds them."""
        first = next(iter(self.layers.values()))
        return first.vera_A, first.vera_B

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The vectors, plus the shared A and B when ``save_projection`` (so loading needs no generator)."""
        state = super().adapter_state_dict()
        if self.config.save_projection:
            state.update({k: v.detach().to("cpu").contiguous() for k, v in zip(PROJECTION_KEYS, self.projections(),
                                                                                strict=True)})
        return state

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """The vectors; A and B too when present, into every layer. Absent (a trainer checkpoint, an adapter saved
        without them), the ones drawn from ``projection_prng_key`` at apply time stay."""
        state = dict(state)
        saved = [state.pop(k, None) for k in PROJECTION_KEYS]
        super().load_adapter_state_dict(state)
        if saved[0] is None or saved[1] is None:
            return
        for key, value in zip(PROJECTION_KEYS, saved, strict=True):
            expected = getattr(next(iter(self.layers.values())), key)
            if value.shape != expected.shape:
                raise ValueError(f"adapter weight {key!r} has shape {tuple(value.shape)}, the model expects "
                                 f"{tuple(expected.shape)}")
        with torch.no_grad():
            for layer in self.layers.values():  # shared storage until a device move copies it per layer
                layer.vera_A.copy_(saved[0])
                layer.vera_B.copy_(saved[1])

    def describe(self) -> dict[str, Any]:
        a, b = self.projections()
        return {"r": self.config.r, "projection": [int(b.shape[0]), int(a.shape[1])], **describe_layers(self.layers)}


def projection_dims(targets: list[Any]) -> tuple[int, int]:
    """(max d_out, max d_in) over the targeted modules, whole modules even where only a slice is targeted (PEFT's
    ``VeraModel._find_dim``); works on built targets and on config-only shapes alike."""
    return max(t.out_features for t in targets), max(t.in_features for t in targets)


def apply_vera(model: nn.Module, config: VeraConfig) -> VeraMethod:
    """Freeze ``model`` and wrap every target layer in a :class:`VeraLinear` (in place), all sharing one pair of
    projections drawn from ``projection_prng_key`` and sized by the largest target; the model's outputs then equal
    the base model's (lambda_b = 0). Errors as :func:`~peftlab.methods.wrapped_linear.apply_wrapped`."""

    def layers_for(targets: list[TargetModule]) -> MakeWrapper:
        max_out, max_in = projection_dims(targets)
        weight = targets[0].module.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        a, b = (p.to(weight.device, dtype) for p in shared_projections(config.r, max_in, max_out,
                                                                       config.projection_prng_key))
        return lambda name, target, slices: VeraLinear(target.module, slices, target.in_features,
                                                       target.fan_in_fan_out, a, b, config.d_initial, config.dropout)

    return apply_wrapped(VeraMethod, VeraLinear, model, config, layers_for)
