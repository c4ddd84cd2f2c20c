"""OFT (Qiu et al. 2023): a trained block-diagonal orthogonal rotation of each target layer's input side, W -> W R^T;
see :mod:`.layer` for the math and :mod:`.blocks` for the Cayley parametrisation."""

from peftlab.methods.base import MethodSpec, SizeKnob, register
from peftlab.methods.oft.config import OftConfig
from peftlab.methods.oft.count import count_oft, max_block_size
from peftlab.methods.oft.layer import OftLinear
from peftlab.methods.oft.method import OftMethod, apply_oft
from peftlab.methods.oft.peft import OftConverter

SPEC = register(
    MethodSpec(
        name="oft",
        config_cls=OftConfig,
        apply=apply_oft,
        summary="block-diagonal orthogonal rotation R of each target's input, y = (x R) W^T; keeps the angles "
                "between W's rows; mergeable",
        # R = Cayley(Q) ~ I + 2Q: an AdamW step moves every entry of Q by ~lr, which turns each weight row by an angle
        # of order lr sqrt(b) (b = 32: ~6 lr), so LoRA's order of rate; a 30-step run wants more (e2e script).
        default_lr=1e-4,
        paper="https://arxiv.org/abs/2306.07280",
        count_trainable=count_oft,
        # The count d_in (b - 1) / 2 per target grows with the block size (the divisor rule keeps it monotone).
        size_knob=SizeKnob("oft_block_size", minimum=2, maximum=max_block_size, replaces=("r",)),
        peft=OftConverter(),
        merge_rule="W <- W R^T (R = diag(R_1..R_n), R_i = Cayley(Q_i) orthogonal)",
    )
)

__all__ = ["SPEC", "OftConfig", "OftLinear", "OftMethod", "apply_oft"]
