"""Soft prompt tuning (Lester et al. 2021): n trainable embeddings prepended to the input; see :mod:`.method`."""

from peftlab.methods.base import MethodSpec, SizeKnob, register
from peftlab.methods.prompt_tuning.config import PROMPT_INITS, PromptTuningConfig
from peftlab.methods.prompt_tuning.count import count_prompt_tuning, max_prompt_tokens
from peftlab.methods.prompt_tuning.method import PROMPT_PARAM, PromptTuningMethod, apply_prompt_tuning
from peftlab.methods.prompt_tuning.peft import PromptTuningConverter

SPEC = register(
    MethodSpec(
        name="prompt-tuning",
        config_cls=PromptTuningConfig,
        apply=apply_prompt_tuning,
        summary="n trainable virtual-token embeddings prepended to every input; the model stays frozen",
        default_lr=3e-2,  # soft prompts need a large learning rate (Lester et al. use 0.3 with Adafactor)
        paper="https://arxiv.org/abs/2104.08691",
        count_trainable=count_prompt_tuning,
        size_knob=SizeKnob("n_tokens", maximum=max_prompt_tokens),
        peft=PromptTuningConverter(),
    )
)

__all__ = ["PROMPT_INITS", "PROMPT_PARAM", "SPEC", "PromptTuningConfig", "PromptTuningMethod", "apply_prompt_tuning"]
