"""What every method that wraps a frozen ``nn.Linear`` / GPT-2 ``Conv1D`` column-slice by column-slice shares
(LoRA, IA3, VeRA, ...): the wrapped layer, its output slices, weight/bias pass-through, the trainable dtype, the
base rows of a slice, :func:`wrap_targets`, which puts one wrapper on each targeted module, :func:`apply_wrapped`,
which applies such a method to a model, and :func:`branch_parameters`, its trainable tensors under PEFT's keys."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.methods.base import LayerwiseMergeable, freeze_all
from peftlab.models.arch import TargetModule, input_embeddings, resolve_targets

# Branch key of a branch that covers the whole layer; ``<module>.<param>.weight``-style keys are PEFT's layout too.
WHOLE = "weight"


class SlicedLinearWrapper(nn.Module):
    """Base of a module that wraps (never subclasses) a frozen linear layer and adapts some of its output slices.

    Args:
        base_layer: the frozen layer; kept as ``self.base_layer``.
        slices: branch key -> (start, stop) output columns (``{WHOLE: (0, d_out)}`` for the whole layer).
        fan_in_fan_out: True when the base weight is stored (d_in, d_out) (``Conv1D``).
    """

    def __init__(self, base_layer: nn.Module, slices: dict[str, tuple[int, int]], fan_in_fan_out: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slices = dict(slices)
        self.fan_in_fan_out = fan_in_fan_out
        self.merged = False

    @property
    def trainable_dtype(self) -> torch.dtype:
        """float32 on half-precision bases (PEFT's autocast_adapter_dtype), else the base dtype."""
        w = self.base_layer.weight
        return torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (code that reads ``layer.weight.dtype`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def whole(self) -> bool:
        """True when one branch covers the whole layer."""
        return list(self.slices) == [WHOLE]

    def new_parameter(self, shape: tuple[int, ...], zero: bool = False) -> nn.Parameter:
        """A trainable tensor in the trainable dtype on the base weight's device: zeros, or kaiming-uniform with
        a = sqrt(5) (nn.Linear's and PEFT's default init of adapter factors)."""
        value = torch.zeros(shape, dtype=self.trainable_dtype, device=self.base_layer.weight.device)
        if not zero:
            nn.init.kaiming_uniform_(value, a=math.sqrt(5))
        return nn.Parameter(value)

    def base_rows(self, key: str) -> torch.Tensor:
        """The base weight rows of one branch as (stop - start, d_in), whatever the storage layout (a view)."""
        start, stop = self.slices[key]
        w = self.base_layer.weight
        return w[:, start:stop].T if self.fan_in_fan_out else w[start:stop, :]

    def add_to_slice(self, out: torch.Tensor, key: str, update: torch.Tensor) -> torch.Tensor:
        """``out`` (..., d_out) with ``update`` (..., stop - start) added to branch ``key``'s output columns, cast to
        out's dtype: out of place for a whole-layer branch (autograd-safe), in place on the slice otherwise."""
        if self.whole:
            return out + update.to(out.dtype)
        start, stop = self.slices[key]
        out[..., start:stop] += update.to(out.dtype)
        return out


class DenseDeltaWrapper(SlicedLinearWrapper):
    """A wrapper whose update of each branch is a dense weight delta, :meth:`delta_rows` (stop - start, d_in) laid
    out like the branch's rows of W (LoHa, LoKr, OFT; VeRA merges through it): the forward adds x delta^T to the
    branch's output columns, merging adds delta to those rows of W.

    The delta is saved at merge time and subtracted at unmerge, so unmerging is exact (to rounding) also for a delta
    that depends on W itself (OFT's (R - I) W).
    """

    def delta_rows(self, key: str) -> torch.Tensor:
        """The update of branch ``key``'s rows of W: (stop - start, d_in), differentiable."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # x: (..., d_in) -> (..., d_out)
        if self.merged:
            return out
        for key in self.slices:
            delta = self.delta_rows(key)
            out = self.add_to_slice(out, key, F.linear(x.to(delta.dtype), delta))  # update: (..., stop - start)
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """Add every branch's delta to its rows of W; forward then skips the branches."""
        if self.merged:
            return
        self._merged_deltas = {key: self.delta_rows(key).detach().clone() for key in self.slices}
        for key, delta in self._merged_deltas.items():
            rows = self.base_rows(key)
            rows += delta.to(rows.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the deltas added at merge time."""
        if not self.merged:
            return
        for key, delta in self._merged_deltas.items():
            rows = self.base_rows(key)
            rows -= delta.to(rows.dtype)
        self._merged_deltas = {}
        self.merged = False


def describe_layers(layers: dict[str, SlicedLinearWrapper]) -> dict[str, Any]:
    """The adapted layer kinds, e.g. ``{"targets": ["c_attn[q,v]", "c_proj"], "n_modules": 4}`` (slices in
    brackets), for a method's ``describe()``."""
    kinds = {name.rsplit(".", 1)[-1] + ("" if layer.whole else f"[{','.join(layer.slices)}]")
             for name, layer in layers.items()}
    return {"targets": sorted(kinds), "n_modules": len(layers)}


def branch_parameters(layers: Mapping[str, SlicedLinearWrapper], per_branch: Sequence[str],
                      per_layer: Sequence[str] = ()) -> dict[str, nn.Parameter]:
    """The trainable tensors of wrapped layers under PEFT's keys, layer by layer (the order optimizer state and
    checkpoints rely on).

    Args:
        layers: module path -> wrapper.
        per_branch: names of the wrapper's ``ParameterDict`` attributes keyed by branch: ``<module>.<name>`` for a
            whole-layer branch, ``<module>.<name>.<slice>`` for a slice; a branch the dict has no entry for (LoKr's
            factored W1) is skipped.
        per_layer: names of plain parameters shared by the layer's branches (VeRA's lambda_d), ``<module>.<name>``,
            before the layer's branches.
    """
    params: dict[str, nn.Parameter] = {}
    for module, layer in layers.items():
        for name in per_layer:
            params[f"{module}.{name}"] = getattr(layer, name)
        for key in layer.slices:
            for name in per_branch:
                by_branch = getattr(layer, name)
                if key in by_branch:
                    params[f"{module}.{name}" + ("" if key == WHOLE else f".{key}")] = by_branch[key]
    return params


Wrapper = TypeVar("Wrapper", bound=SlicedLinearWrapper)
Method = TypeVar("Method", bound=LayerwiseMergeable)
MakeWrapper = Callable[[str, TargetModule, dict[str, tuple[int, int]]], Any]


def freeze_and_resolve(model: nn.Module, target_modules: list[str] | str, wrapper: type, label: str,
                       ) -> list[TargetModule]:
    """Refuse a model that already holds ``wrapper`` layers, freeze every parameter, and resolve the targets.

    Raises:
        ValueError: the method (``label``) is already applied to ``model``.
        ConfigError: ``target_modules`` matches nothing (the message names ``method.target_modules`` and the valid
            names).
    """
    if any(isinstance(m, wrapper) for m in model.modules()):
        raise ValueError(f"{label} is already applied to this model; apply it to a fresh base model")
    freeze_all(model)
    return resolve_targets(model, target_modules, key="method.target_modules")


def wrap_targets(model: nn.Module, targets: list[TargetModule],
                 make: Callable[[str, TargetModule, dict[str, tuple[int, int]]], Wrapper],
                 ) -> tuple[dict[str, Wrapper], list[str]]:
    """Replace each targeted module of ``model`` by ``make(name, target, slices)`` (in place).

    Targets of one module (GPT-2 q/k/v slices of ``c_attn``) share one wrapper whose ``slices`` maps each part to
    its output columns; a whole-module target gets ``{WHOLE: (0, d_out)}``. The wrapper follows the model's
    train/eval mode (a new ``nn.Dropout`` starts in training mode even inside an eval() model).

    Returns:
        Module path -> wrapper, and the paths whose base weight is also the input embedding (merging those would
        change the inputs too).
    """
    groups: dict[str, list[TargetModule]] = {}
    for t in targets:
        groups.setdefault(t.name, []).append(t)
    emb_weight = input_embeddings(model).weight
    layers: dict[str, Wrapper] = {}
    tied: list[str] = []
    for name, group in groups.items():
        first = group[0]
        slices = {t.part: t.out_slice for t in group} if first.part else {WHOLE: (0, first.out_features)}
        layer = make(name, first, slices)
        layer.train(model.training)
        model.set_submodule(name, layer)
        layers[name] = layer
        if first.module.weight is emb_weight:
            tied.append(name)
    return layers, tied


def apply_wrapped(method: type[Method], wrapper: type[SlicedLinearWrapper], model: nn.Module, config: Any,
                  layers_for: Callable[[list[TargetModule]], MakeWrapper]) -> Method:
    """Apply a method that wraps linear layers: refuse a model it is already applied to, freeze every parameter,
    resolve ``config.target_modules``, put one ``wrapper`` on each targeted module (in place) and return the
    ``method`` over those layers.

    Args:
        method: the method's class; its ``merge_label`` names it in errors.
        wrapper: the wrapper class (a model holding one already has the method applied).
        model: the base model.
        config: the method's options.
        layers_for: given every resolved target, the function that builds one module's wrapper,
            ``(name, target, slices) -> wrapper`` (see :func:`wrap_targets`); it sees all targets first, so state
            shared by the layers and sized by them (VeRA's projections) is made once.

    Raises:
        ValueError: the method is already applied to ``model``.
        ConfigError: ``method.target_modules`` matches nothing (the message lists the valid names).
    """
    targets = freeze_and_resolve(model, config.target_modules, wrapper, method.merge_label)
    layers, tied = wrap_targets(model, targets, layers_for(targets))
    return method(model, config, layers, tied)
