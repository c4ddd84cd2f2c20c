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

SPEC = register(
    MethodSpec(
        name="prefix-tuning",
        config_cls=PrefixTuningConfig,
        apply=apply_prefix_tuning,
        summary="n trainable key/value vectors prepended in every attention layer (via the KV cache); model frozen",
        # PEFT's prefix-tuning examples train with 1e-2 (3e-2 for soft prompts); Li & Liang's 5e-5 was for
        # 10 epochs with batch 5 on GPT-2 medium, far too slow for our short runs. 1e-2 lowers the loss of the
        # tiny test models in 10 AdamW steps with and without the MLP (tests/test_prefix_tuning.py).
        default_lr=1e-2,
        paper="https://arxiv.org/abs/2101.00190",
        count_trainable=count_prefix_tuning,
        size_knob=SizeKnob("n_tokens", maximum=max_prefix_tokens),
        budget_note=prefix_note,
    )
)

__all__ = ["KVShape", "PREFIX_MODULE", "PROMPT_KEY", "SPEC", "PrefixCache", "PrefixEncoder", "PrefixTuningConfig",
           "PrefixTuningMethod", "apply_prefix_tuning", "kv_shape"]
