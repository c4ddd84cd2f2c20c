"""Apply LoRA to a model: resolve the targets, wrap each in :class:`LoraLinear`, train only A and B.

Trainable count = sum over targets of r * (d_in + d_out_slice); e.g. GPT-2 q/v slices: 2 * r * (d + d) per block.
DoRA (``use_dora``) adds one magnitude per output feature: + d_out_slice per target.

LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354; ``loraplus_lr_ratio``): in the update s B A (B = 0 at
init) one learning rate for both factors makes feature learning inefficient as the width grows, because A and B
want step sizes of different orders; LoRA+ trains B at eta_B = ratio * eta_A (the paper suggests ratio 16). As
PEFT's ``create_loraplus_optimizer`` does, the group at ratio * lr holds every B and every 1-D LoRA weight (DoRA's
magnitude), and A stays at lr; the schedule scales both rates alike.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftlab.methods.base import LayerwiseMergeable, ParamGroup, freeze_all
from peftlab.methods.lora.config import LoraConfig
from peftlab.methods.lora.layer import WHOLE, LoraLinear
from peftlab.methods.wrapped_linear import wrap_targets
from peftlab.models.arch import TargetModule, resolve_targets


class LoraMethod(LayerwiseMergeable):
    """LoRA applied to one model; ``layers`` maps module path -> its :class:`LoraLinear`."""

    merge_label = "LoRA"

    config: LoraConfig
    layers: dict[str, LoraLinear]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """``<module>.lora_A.<branch>`` and ``<module>.lora_B.<branch>``; branch ``weight`` = whole module.

        With DoRA also ``<module>.lora_magnitude_vector`` (whole module: PEFT's key, shape (d_out,)) or
        ``<module>.lora_magnitude_vector.<branch>`` (a slice).
        """
        params: dict[str, nn.Parameter] = {}
        for name, layer in self.layers.items():
            for key in layer.slices:
                params[f"{name}.lora_A.{key}"] = layer.lora_A[key]
                params[f"{name}.lora_B.{key}"] = layer.lora_B[key]
                if layer.use_dora:
                    suffix = "" if key == WHOLE else f".{key}"
                    params[f"{name}.lora_magnitude_vector{suffix}"] = layer.lora_magnitude_vector[key]
        return params

    def param_groups(self) -> list[ParamGroup]:
        """One group at lr; with LoRA+ (``loraplus_lr_ratio`` != 1) A at lr and B and DoRA's magnitude at
        ratio * lr (see the module docstring)."""
        ratio = self.config.loraplus_lr_ratio
        if ratio == 1:  # one group, as every other method: the optimizer state keeps its layout
            return super().param_groups()
        params = self.trainable_parameters()
        fast = {k: p for k, p in params.items() if ".lora_B." in k or p.ndim == 1}
        return [ParamGroup("lora_A", {k: p for k, p in params.items() if k not in fast}),
                ParamGroup("lora_B", fast, lr_scale=ratio)]

    def describe(self) -> dict[str, Any]:
        """Rank, scaling and the adapted layer kinds, e.g. ``["c_attn[q,v]"]`` (slices in brackets)."""
        kinds = {name.rsplit(".", 1)[-1] + ("" if layer.whole else f"[{','.join(layer.slices)}]")
                 for name, layer in self.layers.items()}
        info = {"r": self.config.r, "scaling": self.config.scaling, "targets": sorted(kinds),
                "n_modules": len(self.layers)}
        if self.config.use_dora:  # only when on: plain LoRA results keep their earlier shape
            info["dora"] = True
        if self.config.init != "default":
            info["init"] = self.config.init
        if self.config.loraplus_lr_ratio != 1:
            info["loraplus_lr_ratio"] = self.config.loraplus_lr_ratio
        return info


def apply_lora(model: nn.Module, config: LoraConfig) -> LoraMethod:
    """Freeze ``model`` and wrap every target layer in a :class:`LoraLinear` (in place).

    Args:
        model: a GPT-2 or Llama-family causal LM.
        config: the LoRA options.

    Returns:
        The :class:`LoraMethod`; at this point the model's outputs equal the base model's (B = 0; with DoRA
        also m = ||W||_row, so the DoRA factor is 1).

    Raises:
        ConfigError: ``method.target_modules`` matches nothing (the message lists the valid names).
    """
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ValueError("LoRA is already applied to this model; apply it to a fresh base model")
    freeze_all(model)
    targets = resolve_targets(model, config.target_modules, key="method.target_modules")

    def make(name: str, target: TargetModule, slices: dict[str, tuple[int, int]]) -> LoraLinear:
        return LoraLinear(target.module, slices, target.in_features, target.fan_in_fan_out, config.r,
                          config.scaling, config.dropout, use_dora=config.use_dora, init=config.init)

    layers, tied = wrap_targets(model, targets, make)
    return LoraMethod(model, config, layers, tied)
