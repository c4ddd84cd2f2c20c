"""MAM adapter (He et al. 2022): prefix tuning on attention + a scaled parallel adapter on every FFN, built from the
prefix-tuning and adapter methods; see :mod:`.method`."""

from peftlab.methods.base import MethodSpec, SizeKnob, register
from peftlab.methods.mam.config import MamConfig
from peftlab.methods.mam.count import count_mam, mam_note
from peftlab.methods.mam.method import MamMethod, apply_mam

SPEC = register(
    MethodSpec(
        name="mam",
        config_cls=MamConfig,
        apply=apply_mam,
        summary="prefix tuning on attention + scaled parallel adapter (s=4) on every FFN (He et al.'s MAM)",
        # One rate for both parts, the prefix's: its MLP reparametrization diverged at 1e-2 on SmolLM2 / E2E and
        # trains at 3e-4 (BENCHMARKS.md), a rate at which the zero-initialised adapter also learns.
        default_lr=3e-4,
        paper="https://arxiv.org/abs/2110.04366",
        count_trainable=count_mam,
        # The adapters' 2 d b + b + d per block grows with b; the prefix part is fixed by n_tokens.
        size_knob=SizeKnob("bottleneck_size"),
        budget_note=mam_note,
        no_peft="PEFT has no MAM adapter: it has prefix tuning but no bottleneck / parallel adapters (those live in "
                "the separate adapters library), and one PEFT adapter holds one method",
    )
)

__all__ = ["SPEC", "MamConfig", "MamMethod", "apply_mam"]
