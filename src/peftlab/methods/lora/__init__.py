"""LoRA (Hu et al. 2021): trainable low-rank updates B A on chosen linear layers; see :mod:`.layer` for the math."""

from peftlab.methods.base import MethodSpec, SizeKnob, register
from peftlab.methods.lora.config import LoraConfig
from peftlab.methods.lora.count import count_lora
from peftlab.methods.lora.layer import LoraLinear
from peftlab.methods.lora.method import LoraMethod, apply_lora
from peftlab.methods.lora.peft import LoraConverter

SPEC = register(
    MethodSpec(
        name="lora",
        config_cls=LoraConfig,
        apply=apply_lora,
        summary="low-rank updates (alpha/r) B A on chosen linear layers; mergeable into the base weights",
        default_lr=2e-4,
        paper="https://arxiv.org/abs/2106.09685",
        count_trainable=count_lora,
        size_knob=SizeKnob("r"),
        peft=LoraConverter(),
        merge_rule="W += s B A; DoRA: W <- m / ||W + s B A|| (W + s B A)",
    )
)

__all__ = ["SPEC", "LoraConfig", "LoraLinear", "LoraMethod", "apply_lora"]
