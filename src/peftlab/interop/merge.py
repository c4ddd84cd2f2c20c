"""Merge an adapter into its base model and save a plain Hugging Face model folder.

``peftlab merge --adapter DIR OUT`` loads the base model (through :mod:`peftlab.models.loading`, so the
``smollm2-135m`` alias and ``.gguf`` files work), applies the adapter, folds it into the base weights with the
method's own ``merge()`` (each method states its rule as ``MethodSpec.merge_rule``; ``peftlab methods`` shows
them), puts the original modules back in place of the method's wrapper layers and writes ``save_pretrained`` of the
model plus the tokenizer. The result loads with ``AutoModelForCausalLM`` alone and computes what base + adapter
computed. Methods that change the inputs or add layers have no merged form and are refused, as is a target that
shares its weight with the input embeddings (a tied LM head: merging would change the embeddings too).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from peftlab.config import ModelConfig
from peftlab.interop.adapter_files import load_adapter, read_adapter_config
from peftlab.interop.peft_format import PeftFormatError, atomic_folder, ensure_free
from peftlab.methods.wrapped_linear import SlicedLinearWrapper
from peftlab.models.loading import DTYPES, load_model_and_tokenizer
from peftlab.registry import all_methods


class NotMergeableError(ValueError):
    """The adapter's method cannot be folded into the base weights (the message says why)."""


def unwrap_merged(model: nn.Module) -> list[str]:
    """Replace every merged wrapper layer (LoRA, IA3) by the base layer it wraps; returns their paths.

    Raises:
        NotMergeableError: a wrapper layer is not merged (its update would be lost).
    """
    wrappers = [(name, m) for name, m in model.named_modules() if isinstance(m, SlicedLinearWrapper)]
    for name, wrapper in wrappers:
        if not wrapper.merged:
            raise NotMergeableError(f"{name} ({type(wrapper).__name__}) is not merged; call method.merge() first")
        model.set_submodule(name, wrapper.base_layer)
    return [name for name, _ in wrappers]


def mergeable_methods() -> str:
    """The methods with a merged form and their rules, e.g. ``lora (W += s B A), ia3 (...)``."""
    return ", ".join(f"{spec.name} ({spec.merge_rule})" for spec in all_methods() if spec.merge_rule)


def merged_model(model: nn.Module, adapter: str | Path, method_name: str) -> nn.Module:
    """Apply ``adapter`` to ``model``, merge it and unwrap: ``model`` becomes a plain transformers model again.

    Raises:
        NotMergeableError: the method has no merged form, or merging left weights the base model does not have.
    """
    base_keys = set(model.state_dict())
    method, _ = load_adapter(model, adapter)
    if not method.mergeable:
        raise NotMergeableError(
            f"adapter {adapter}: method {method_name!r} cannot be merged into the base weights (its mergeable is "
            f"false: it changes the inputs, adds layers, or adapts a weight shared with the input embeddings); "
            f"methods that merge: {mergeable_methods()}, on layers other than a tied LM head")
    with torch.no_grad():
        method.merge()
    unwrap_merged(model)
    left = sorted(set(model.state_dict()) ^ base_keys)
    if left:
        raise NotMergeableError(f"adapter {adapter}: after merging, the model's weights differ from the base "
                                f"model's by {left[:5]}; it cannot be saved as a plain model")
    return model


def merge_adapter(adapter: str | Path, out: str | Path, model_name: str | None = None,
                  dtype: str = "float32") -> Path:
    """``peftlab merge --adapter DIR OUT``: write base + adapter, merged, as a Hugging Face model folder.

    Args:
        adapter: a peftlab adapter folder or a PEFT adapter folder.
        out: the folder to create (atomically: a temporary sibling, then a rename); refused when not empty.
        model_name: the base model (``model.name`` syntax); default: the one the adapter records.
        dtype: dtype of the saved weights (``float32``, ``bfloat16``, ``float16``); merging itself runs in float32.

    Raises:
        NotMergeableError: the method cannot be merged (e.g. prompt tuning).
        OutputExistsError: ``out`` is not empty.
    """
    adapter = Path(adapter)
    ensure_free(out)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    config = read_adapter_config(adapter)
    name = model_name or config.get("base_model")
    if not name:
        raise PeftFormatError(f"{adapter}: the adapter names no base model; pass it with --model")
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name=name))
    model = merged_model(model, adapter, config["method"]).to(DTYPES[dtype])
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out)
