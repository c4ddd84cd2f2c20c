"""Apply (IA)^3 to a model: resolve the targets, wrap each in :class:`IA3Linear`, train only the vectors.

Trainable count = sum over targets of d_out_slice (output scaling) or d_in (input scaling); the default on Llama
(k, v, down) is n_layers * (2 * n_kv_heads * head_dim + intermediate_size), on GPT-2 n_layers * (2 d + 4 d).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from peftlab.config import ConfigError
from peftlab.methods.base import LayerwiseMergeable, freeze_all
from peftlab.methods.ia3.config import IA3Config
from peftlab.methods.ia3.layer import IA3Linear
from peftlab.methods.wrapped_linear import branch_parameters, wrap_targets
from peftlab.models.arch import TargetModule, resolve_targets

# What feedforward_modules=null means: the FFN down projection, whose input is the FFN's intermediate activation.
DEFAULT_FEEDFORWARD = ["down"]


class IA3Method(LayerwiseMergeable):
    """(IA)^3 applied to one model; ``layers`` maps module path -> its :class:`IA3Linear`."""

    merge_label = "IA3"

    config: IA3Config
    layers: dict[str, IA3Linear]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """``<module>.ia3_l`` for a whole layer (PEFT's key and shape), ``<module>.ia3_l.<slice>`` for a slice."""
        return branch_parameters(self.layers, ["ia3_l"])

    def describe(self) -> dict[str, Any]:
        """Rescaled layer kinds, e.g. ``{"output": ["c_attn[k,v]"], "input": ["c_proj"]}``."""
        kinds: dict[str, set[str]] = {"output": set(), "input": set()}
        for name, layer in self.layers.items():
            leaf = name.rsplit(".", 1)[-1] + ("" if layer.whole else f"[{','.join(layer.slices)}]")
            kinds["input" if layer.feedforward else "output"].add(leaf)
        return {"output": sorted(kinds["output"]), "input": sorted(kinds["input"]), "n_modules": len(self.layers)}


def feedforward_names(resolve: Callable[..., list[Any]], config: IA3Config, targets: list[Any]) -> set[str]:
    """Module paths among ``targets`` whose input (not output) is rescaled.

    Args:
        resolve: ``resolve(names, key=...)`` -> resolved targets with ``name`` and ``part``: ``resolve_targets`` on
            a model, or ``resolve_target_shapes`` on a model shape (the budget counter), so both follow one rule.
        config: the IA3 options.
        targets: the resolved ``target_modules``.

    Raises:
        ConfigError: an explicit ``feedforward_modules`` item matches a layer that is not a whole-layer target.
    """
    target_names = {t.name for t in targets}
    sliced = {t.name for t in targets if t.part is not None}
    if config.feedforward_modules is None:
        try:
            default = resolve(DEFAULT_FEEDFORWARD, key="method.feedforward_modules")
        except ConfigError:  # a family without a canonical FFN down projection: no input scaling by default
            return set()
        return {t.name for t in default} & (target_names - sliced)
    if not config.feedforward_modules:
        return set()
    key = "method.feedforward_modules"
    chosen = resolve(config.feedforward_modules, key=key)
    for t in chosen:
        if t.part is not None or t.name in sliced:
            raise ConfigError(f"{key}: {t.name} is targeted as {t.part or 'q/k/v'} output slices; input scaling "
                              f"rescales a whole layer's input, so target the whole layer or drop it from {key}")
        if t.name not in target_names:
            raise ConfigError(f"{key}: {t.name} is not among method.target_modules; feedforward modules must be a "
                              f"subset of the targets (as in PEFT)")
    return {t.name for t in chosen}


def apply_ia3(model: nn.Module, config: IA3Config) -> IA3Method:
    """Freeze ``model`` and wrap every target layer in an :class:`IA3Linear` (in place).

    Args:
        model: a GPT-2 or Llama-family causal LM.
        config: the (IA)^3 options.

    Returns:
        The :class:`IA3Method`; at this point the model's outputs equal the base model's (all scales are 1).

    Raises:
        ConfigError: ``method.target_modules`` or ``method.feedforward_modules`` matches nothing or is inconsistent
            (the message lists the valid names).
    """
    if any(isinstance(m, IA3Linear) for m in model.modules()):
        raise ValueError("IA3 is already applied to this model; apply it to a fresh base model")
    targets = resolve_targets(model, config.target_modules, key="method.target_modules")
    feedforward = feedforward_names(partial(resolve_targets, model), config, targets)
    freeze_all(model)

    def make(name: str, target: TargetModule, slices: dict[str, tuple[int, int]]) -> IA3Linear:
        return IA3Linear(target.module, slices, target.in_features, target.fan_in_fan_out, name in feedforward)

    layers, tied = wrap_targets(model, targets, make)
    return IA3Method(model, config, layers, tied)
