"""(IA)^3 (Liu et al. 2022): learned vectors rescale keys, values and the FFN activation; see :mod:`.layer`."""

from peftlab.methods.base import MethodSpec, register
from peftlab.methods.ia3.config import IA3Config
from peftlab.methods.ia3.count import count_ia3
from peftlab.methods.ia3.layer import IA3Linear
from peftlab.methods.ia3.method import IA3Method, apply_ia3
from peftlab.methods.ia3.peft import IA3Converter

SPEC = register(
    MethodSpec(
        name="ia3",
        config_cls=IA3Config,
        apply=apply_ia3,
        summary="learned vectors (init 1) rescale keys, values and the FFN down projection's input; mergeable",
        default_lr=3e-3,
        paper="https://arxiv.org/abs/2205.05638",
        count_trainable=count_ia3,
        peft=IA3Converter(),
        merge_rule="rows (output scaling) or columns (input scaling) of W times l",
    )
)

__all__ = ["SPEC", "IA3Config", "IA3Linear", "IA3Method", "apply_ia3"]
