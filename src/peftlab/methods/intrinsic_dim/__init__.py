"""Intrinsic-dimension training (Aghajanyan et al. 2020; Li et al. 2018): W = W0 + P theta_d, see :mod:`.method`.

Default learning rate 1e-2: P has unit-norm columns, so one Adam step (every coordinate of theta_d moves ~lr)
moves the weights by ~lr * sqrt(d) in L2 norm, while full fine-tuning at 2e-5 moves them by ~2e-5 * sqrt(D). On
SmolLM2-135M all-linear (D ~ 1.06e8) with d = 1000 the two match at lr ~ 6.5e-3; the paper, too, trains theta_d with
learning rates orders of magnitude above full fine-tuning's. Scale it ~1/sqrt(d) when sweeping d.
"""

from peftlab.methods.base import MethodSpec, SizeKnob, register
from peftlab.methods.intrinsic_dim.config import IntrinsicDimConfig
from peftlab.methods.intrinsic_dim.count import count_intrinsic_dim, intrinsic_dim_note, subspace_size
from peftlab.methods.intrinsic_dim.method import IntrinsicDimMethod, SubspaceOffset, apply_intrinsic_dim
from peftlab.methods.intrinsic_dim.projection import (
    DenseProjection,
    FastfoodProjection,
    build_projections,
    fast_walsh_hadamard,
)

SPEC = register(
    MethodSpec(
        name="intrinsic-dim",
        config_cls=IntrinsicDimConfig,
        apply=apply_intrinsic_dim,
        summary="train a d-dim vector theta_d; weights = W0 + P theta_d with a fixed random (Fastfood) P; mergeable",
        default_lr=1e-2,
        paper="https://arxiv.org/abs/2012.13255",
        count_trainable=count_intrinsic_dim,
        size_knob=SizeKnob("d", maximum=subspace_size),
        budget_note=intrinsic_dim_note,
        no_peft="PEFT has no random-subspace (intrinsic-dimension) adapter type",
        merge_rule="W += P theta (SAID: W += lambda_i (P theta)_i)",
    )
)

__all__ = ["SPEC", "DenseProjection", "FastfoodProjection", "IntrinsicDimConfig", "IntrinsicDimMethod",
           "SubspaceOffset", "apply_intrinsic_dim", "build_projections", "fast_walsh_hadamard"]
