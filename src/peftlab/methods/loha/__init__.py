"""LoHa (Hyeon-Woo et al. 2022, via LyCORIS): the Hadamard product of two low-rank products as the weight update;
see :mod:`.layer` for the math."""

from peftlab.methods.base import MethodSpec, SizeKnob, register
from peftlab.methods.loha.config import LohaConfig
from peftlab.methods.loha.count import count_loha
from peftlab.methods.loha.layer import LohaLinear
from peftlab.methods.loha.method import LohaMethod, apply_loha
from peftlab.methods.loha.peft import LohaConverter

SPEC = register(
    MethodSpec(
        name="loha",
        config_cls=LohaConfig,
        apply=apply_loha,
        summary="update (alpha/r) (W1a W1b) * (W2a W2b), rank up to r^2 from 2r(d_in + d_out) weights; mergeable",
        default_lr=2e-3,  # 10x LoRA's: with PEFT's init one factor starts at zero and learns slowly; in 30 E2E
        # steps (BENCHMARKS issue 3) lr 1e-3 stayed near zero-shot (BLEU 7.8), 1e-2 reached 61.0
        paper="https://arxiv.org/abs/2108.06098",
        count_trainable=count_loha,
        size_knob=SizeKnob("r"),
        peft=LohaConverter(),
        merge_rule="W += (alpha / r) (W1a W1b) * (W2a W2b)",
    )
)

__all__ = ["SPEC", "LohaConfig", "LohaLinear", "LohaMethod", "apply_loha"]
