"""Full fine-tuning: every parameter trains (the reference); see :mod:`.method`."""

from peftlab.methods.base import MethodSpec, register
from peftlab.methods.full.config import FullConfig
from peftlab.methods.full.count import count_full
from peftlab.methods.full.method import FullMethod, apply_full

SPEC = register(
    MethodSpec(
        name="full",
        config_cls=FullConfig,
        apply=apply_full,
        summary="every parameter trains (the reference)",
        default_lr=2e-5,
        count_trainable=count_full,
        no_peft="full fine-tuning saves every weight; save the model itself instead of a PEFT adapter",
    )
)

__all__ = ["SPEC", "FullConfig", "FullMethod", "apply_full"]
