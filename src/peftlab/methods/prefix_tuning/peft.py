"""Prefix tuning <-> Hugging Face PEFT ``PREFIX_TUNING``.

Export: ``prompt_embeddings`` (n, L * 2 * k), PEFT's key and layout (layer-major, then key/value, then head, then
head_dim; k = n_kv_heads * head_dim, so PEFT's ``token_dim`` = k and ``num_attention_heads`` = n_kv_heads, as PEFT
itself records them for grouped-query models). An unfolded adapter is folded first (P = MLP(P')); the export has
``prefix_projection: false`` because the file holds P itself. Import: num_virtual_tokens -> n_tokens,
reparametrize=false (PEFT's file holds the prefix P itself, also when it was trained with prefix_projection).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.interop.peft_format import Exported, PeftConverter, prompt_learning_shape, required


def export_prefix_tuning(method: Any, base: str | None) -> Exported:
    shape = method.shape
    with torch.no_grad():
        prefix = method.encoder().detach().clone()  # (n, L * 2 * k); folds an unfolded P' and MLP on the fly
    options = {
        "num_virtual_tokens": int(prefix.shape[0]), **prompt_learning_shape(method.model),
        "token_dim": shape.kv_dim, "num_attention_heads": shape.n_kv_heads,  # PEFT's values under GQA
        "encoder_hidden_size": shape.kv_dim, "prefix_projection": False, "init_weights": None,
    }
    return options, {"prompt_embeddings": prefix}


def _prefix_options(config: dict[str, Any], where: Path) -> dict[str, Any]:
    return {"n_tokens": required(config, "num_virtual_tokens", where), "reparametrize": False}


class PrefixTuningConverter(PeftConverter):
    """Prefix tuning <-> PEFT ``PREFIX_TUNING`` (see the module docstring)."""

    peft_type = "PREFIX_TUNING"
    mapped = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                        "num_layers"})
    ignored = frozenset({"encoder_hidden_size", "prefix_projection", "init_weights"})

    def export(self, method: Any, base: str | None) -> Exported:
        return export_prefix_tuning(method, base)

    def import_options(self, config: dict[str, Any], where: Path) -> dict[str, Any]:
        return _prefix_options(config, where)

    def dimensions(self, model: nn.Module) -> dict[str, int]:
        return {"num_layers": prompt_learning_shape(model)["num_layers"]}
