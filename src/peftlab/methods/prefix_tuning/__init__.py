"""Prefix tuning (Li & Liang 2021): trainable key/value prefixes in every attention layer; see :mod:`.method`."""

from peftlab.methods.base import MethodSpec, SizeKnob, register
from peftlab.methods.prefix_tuning.config import PrefixTuningConfig
from peftlab.methods.prefix_tuning.count import count_prefix_tuning, max_prefix_tokens, prefix_note
from peftlab.methods.prefix_tuning.method import (
    PREFIX_MODULE,
    PROMPT_KEY,
    KVShape,
    PrefixCache,
    PrefixEncoder,
    PrefixTuningMethod,
    apply_prefix_tuning,
    kv_shape,
)
from peftlab.methods.prefix_tuning.peft import PrefixTuningConverter

SPEC = register(
    MethodSpec(
        name="prefix-tuning",
        config_cls=PrefixTuningConfig,
        apply=apply_prefix_tuning,
        summary="n trainable key/value vectors prepended in every attention layer (via the KV cache); model frozen",
        # With the MLP reparametrization (the default) every step moves each of W_2's L*2*k x h entries by ~lr,
        # so P moves by ~lr * h: on SmolLM2 / E2E, lr 1e-2 diverged (loss 4.5 -> 9.4 in 30 steps, degenerate
        # output) while 3e-4 reached BLEU 56.8 (BENCHMARKS.md). Without the MLP (reparametrize=false) P trains
        # directly and wants a soft-prompt-like lr (PEFT's examples use 1e-2): set train.lr.
        default_lr=3e-4,
        paper="https://arxiv.org/abs/2101.00190",
        count_trainable=count_prefix_tuning,
        size_knob=SizeKnob("n_tokens", maximum=max_prefix_tokens),
        budget_note=prefix_note,
        peft=PrefixTuningConverter(),
    )
)

__all__ = ["KVShape", "PREFIX_MODULE", "PROMPT_KEY", "SPEC", "PrefixCache", "PrefixEncoder", "PrefixTuningConfig",
           "PrefixTuningMethod", "apply_prefix_tuning", "kv_shape"]
