"""IA3 <-> Hugging Face PEFT ``IA3``.

Export: ``<module>.ia3_l``, (d_out, 1) for output scaling and (1, d_in) for input scaling, PEFT's shapes; a sliced
``c_attn`` becomes one (3d, 1) vector with ones on the untouched slice. Import: target_modules and
feedforward_modules (PEFT matches those as plain suffixes among the targets; with the model at hand they are
rewritten to names peftlab resolves to the same layers).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.interop.peft_format import (
    PEFT_KEY_PREFIX,
    Exported,
    PeftConverter,
    base_module_names,
    minimal_names,
    peft_list_match,
    peft_suffix_match,
    peft_target_modules,
    required,
)
from peftlab.models.arch import resolve_targets


def export_ia3(method: Any, base: str | None) -> Exported:
    layers = method.layers
    state: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        if layer.whole:
            vector = next(iter(layer.ia3_l.values()))  # (d_out, 1) or (1, d_in): PEFT's shapes
        else:
            vector = layer.output_scale().detach().view(-1, 1)  # ones on the untouched slices
        state[f"{PEFT_KEY_PREFIX}{name}.ia3_l"] = vector
    feedforward = [n for n, layer in layers.items() if layer.feedforward]
    options = {
        "target_modules": peft_target_modules(method.model, layers),
        # PEFT matches feedforward names as plain suffixes, peftlab as dotted ones: names that select the same
        # modules under the looser rule (over every module) select them under both.
        "feedforward_modules": minimal_names(feedforward, base_module_names(method.model, layers),
                                             peft_suffix_match),
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "init_ia3_weights": True, "exclude_modules": None,
    }
    return options, state


def _ia3_options(config: dict[str, Any], where: Path) -> dict[str, Any]:
    return {"target_modules": required(config, "target_modules", where),
            "feedforward_modules": config.get("feedforward_modules")}


def _exact_feedforward(model: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
    """IA3 options whose ``feedforward_modules`` select, by peftlab's rule, the layers PEFT's rule selects."""
    items = options["feedforward_modules"]
    if items is None:
        return options
    targets = [t.name for t in resolve_targets(model, options["target_modules"], key="target_modules")]
    if isinstance(items, str):
        chosen = [t for t in targets if re.fullmatch(items, t)]
    else:
        chosen = [t for t in targets if any(peft_suffix_match(t, item) for item in items)]
    universe = [name for name, _ in model.named_modules() if name]
    return {**options, "feedforward_modules": minimal_names(chosen, universe, peft_list_match)}


class IA3Converter(PeftConverter):
    """IA3 <-> PEFT ``IA3`` (see the module docstring)."""

    peft_type = "IA3"
    mapped = frozenset({"target_modules", "feedforward_modules"})
    ignored = frozenset({"fan_in_fan_out", "init_ia3_weights"})

    def export(self, method: Any, base: str | None) -> Exported:
        return export_ia3(method, base)

    def import_options(self, config: dict[str, Any], where: Path) -> dict[str, Any]:
        return _ia3_options(config, where)

    def fit_options(self, model: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
        return _exact_feedforward(model, options)
