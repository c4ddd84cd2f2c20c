"""VeRA (Kopiczko et al. 2024): shared frozen random projections A, B and two trained vectors per layer; see
:mod:`.layer` for the math."""

from peftlab.methods.base import MethodSpec, SizeKnob, register
from peftlab.methods.vera.config import VeraConfig
from peftlab.methods.vera.count import count_vera
from peftlab.methods.vera.layer import VeraLinear
from peftlab.methods.vera.method import VeraMethod, apply_vera
from peftlab.methods.vera.peft import VeraConverter

SPEC = register(
    MethodSpec(
        name="vera",
        config_cls=VeraConfig,
        apply=apply_vera,
        summary="shared frozen random A, B; trains lambda_b * B (lambda_d * A x) vectors per layer; mergeable",
        default_lr=1e-2,
        paper="https://arxiv.org/abs/2310.11454",
        count_trainable=count_vera,
        size_knob=SizeKnob("r"),
        peft=VeraConverter(),
        merge_rule="W += diag(lambda_b) B diag(lambda_d) A",
    )
)

__all__ = ["SPEC", "VeraConfig", "VeraLinear", "VeraMethod", "apply_vera"]
