"""Prompt tuning <-> Hugging Face PEFT ``PROMPT_TUNING``: ``prompt_embeddings`` (n, d), PEFT's key.

Import: num_virtual_tokens -> n_tokens, prompt_tuning_init RANDOM/SAMPLE_VOCAB -> init random/vocab (TEXT -> random:
the initialisation is irrelevant once the weights are loaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from peftlab.interop.peft_format import Exported, PeftConverter, prompt_learning_shape, required

PEFT_PROMPT_INITS = {"RANDOM": "random", "SAMPLE_VOCAB": "vocab", "TEXT": "random"}


def export_prompt_tuning(method: Any, base: str | None) -> Exported:
    prompt = method.prompt  # (n, d)
    cfg = method.config
    init = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB"}.get(cfg.init, "RANDOM")
    text = cfg.init_text if cfg.init == "text" and cfg.init_text and base else None
    options = {
        "num_virtual_tokens": int(prompt.shape[0]), "token_dim": int(prompt.shape[1]),
        **prompt_learning_shape(method.model),
        # Only used by PEFT when it initialises a trainable prompt (is_trainable=True): then TEXT tokenizes the text.
        "prompt_tuning_init": "TEXT" if text else init, "prompt_tuning_init_text": text,
        "tokenizer_name_or_path": base if text else None, "tokenizer_kwargs": None,
    }
    return options, {"prompt_embeddings": prompt}


def _prompt_options(config: dict[str, Any], where: Path) -> dict[str, Any]:
    init = config.get("prompt_tuning_init") or "RANDOM"
    return {"n_tokens": required(config, "num_virtual_tokens", where), "init": PEFT_PROMPT_INITS.get(init, "random")}


class PromptTuningConverter(PeftConverter):
    """Prompt tuning <-> PEFT ``PROMPT_TUNING`` (see the module docstring)."""

    peft_type = "PROMPT_TUNING"
    mapped = frozenset({"num_virtual_tokens", "prompt_tuning_init", "token_dim", "num_transformer_submodules",
                        "num_attention_heads", "num_layers"})
    ignored = frozenset({"prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"})

    def export(self, method: Any, base: str | None) -> Exported:
        return export_prompt_tuning(method, base)

    def import_options(self, config: dict[str, Any], where: Path) -> dict[str, Any]:
        return _prompt_options(config, where)

    def dimensions(self, model: nn.Module) -> dict[str, int]:
        shape = prompt_learning_shape(model)
        return {"num_layers": shape["num_layers"], "token_dim": model.get_input_embeddings().embedding_dim}
