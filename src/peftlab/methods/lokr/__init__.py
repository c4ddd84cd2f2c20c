"""LoKr (LyCORIS; Yeh et al. 2024): the weight update as a scaled Kronecker product of two small factors; see
:mod:`.layer` for the math."""

from peftlab.methods.base import MethodSpec, register
from peftlab.methods.lokr.config import LokrConfig
from peftlab.methods.lokr.count import count_lokr
from peftlab.methods.lokr.layer import LokrLinear
from peftlab.methods.lokr.method import LokrMethod, apply_lokr
from peftlab.methods.lokr.peft import LokrConverter

SPEC = register(
    MethodSpec(
        name="lokr",
        config_cls=LokrConfig,
        apply=apply_lokr,
        summary="update (alpha/r) kron(W1, W2) with W2 low-rank when r is small; mergeable",
        default_lr=2e-3,  # 10x LoRA's: with PEFT's init one factor starts at zero and learns slowly; in 30 E2E
        # steps (BENCHMARKS issue 3) lr 1e-3 stayed near zero-shot (BLEU 9.0), 1e-2 reached 58.5
        paper="https://arxiv.org/abs/2309.14859",
        count_trainable=count_lokr,
        # No size knob: the count is not monotone in r (W2 turns from factored to full at r = max(k, n) / 2).
        peft=LokrConverter(),
        merge_rule="W += (alpha / r) kron(W1, W2)",
    )
)

__all__ = ["SPEC", "LokrConfig", "LokrLinear", "LokrMethod", "apply_lokr"]
