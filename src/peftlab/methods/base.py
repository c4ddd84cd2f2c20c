"""The contract every PEFT method implements, and the method registry.

A method is one folder under ``peftlab/methods/`` whose ``__init__.py`` calls :func:`register` with a
:class:`MethodSpec`. ``spec.apply(model, config)`` modifies the model in place (wrapping modules, adding
parameters) and returns a :class:`PeftMethod` object that the trainer, evaluator and saver talk to. The core
never switches on method names: anything a method does to the inputs (soft prompts, prefixes) goes through
:meth:`PeftMethod.prepare_inputs`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.config import ConfigError, coerce_fields


class PeftMethod:
    """A method applied to one model.

    Subclasses set ``self.model`` (the modified model) and ``self.config`` (their config dataclass) and override
    :meth:`trainable_parameters`; the other hooks have defaults that suit methods that only add or unfreeze weights.
    """

    model: nn.Module
    config: Any

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> parameter for every weight this method trains (names are stable keys for saving)."""
        raise NotImplementedError

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What is saved as the adapter: by default the trainable parameters, detached, on CPU, contiguous."""
        return {k: v.detach().to("cpu").contiguous() for k, v in self.trainable_parameters().items()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy saved adapter weights in; a missing or unexpected key or a shape mismatch raises ``ValueError``."""
        params = self.trainable_parameters()
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(
                f"adapter weights do not match this model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        with torch.no_grad():
            for name, param in params.items():
                value = state[name]
                if value.shape != param.shape:
                    raise ValueError(
                        f"adapter weight {name!r} has shape {tuple(value.shape)}, "
                        f"the model expects {tuple(param.shape)}"
                    )
                param.copy_(value.to(param.device, param.dtype))

    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Model keyword arguments for a batch.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T), 1 for real tokens.
            labels: (B, T) with -100 where no loss is taken, or None at generation time.

        Returns:
            ``input_ids`` or ``inputs_embeds`` (B, T', d), ``attention_mask`` (B, T') and, when given, ``labels``
            (B, T'); methods that prepend virtual tokens return T' = n + T with masks and labels extended.
        """
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if labels is not None:
            out["labels"] = labels
        return out

    def frozen_trunk(self) -> bool:
        """True when nothing before the output head trains, so the trunk's hidden states depend only on the input.

        The trainer may then compute each training example's trunk features once and reuse them in later epochs
        (``train.cache_frozen_trunk``). The default, False, is always safe.
        """
        return False

    def after_training(self) -> None:
        """Called once after training, before the adapter is saved (e.g. prefix tuning folds its MLP into P)."""

    @property
    def mergeable(self) -> bool:
        """True when :meth:`merge` folds the method into the base weights (inference without overhead)."""
        return False

    def merge(self) -> None:
        """Fold the method into the base weights; a no-op for methods that are not mergeable."""

    def unmerge(self) -> None:
        """Undo :meth:`merge`."""

    def describe(self) -> dict[str, Any]:
        """Facts recorded in the result's ``train_info['method']`` (e.g. whether a head was untied)."""
        return {}


class LayerwiseMergeable(PeftMethod):
    """A method made of wrapped layers that each fold into their base weight (LoRA, IA3).

    Subclasses set ``self.layers`` (name -> layer with ``merge()``/``unmerge()``), ``self._tied`` (targets whose
    weight is also the input embedding: merging those would change the inputs too) and ``merge_label``.
    """

    layers: dict[str, nn.Module]
    _tied: list[str]
    merge_label: str = "method"

    @property
    def mergeable(self) -> bool:
        """False when a target shares its weight with the input embeddings (a tied LM head)."""
        return not self._tied

    def merge(self) -> None:
        if not self.mergeable:
            warnings.warn(f"{self.merge_label} not merged: {self._tied} share their weight with the input embeddings",
                          stacklevel=2)
            return
        for layer in self.layers.values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()


@dataclass(frozen=True)
class SizeKnob:
    """The option that sets a method's size, for solving an equal parameter budget (:mod:`peftlab.methods.budget`).

    The method's trainable count must not decrease as the option grows.

    Attributes:
        option: the config field (``"r"``, ``"n_tokens"``, ...); an integer >= ``minimum``.
        minimum: the smallest valid value.
        maximum: ``maximum(shape, config) -> int`` the largest value worth trying for a model shape
            (:class:`peftlab.models.shape.ModelShape`; e.g. the number of blocks); None: unbounded.
        replaces: options dropped when the knob is set (they are another way to give the same size).
    """

    option: str
    minimum: int = 1
    maximum: Callable[[Any, Any], int] | None = None
    replaces: tuple[str, ...] = ()


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: the name used in configs (``method=lora``).
        config_cls: the method's config dataclass; its ``__post_init__`` raises ``ConfigError`` on bad values.
        apply: ``apply(model, config) -> PeftMethod``; freezes what should be frozen and modifies ``model``.
        summary: one line for ``peftlab methods``.
        default_lr: learning rate used when ``train.lr`` is not set.
        paper: link to the method's paper.
        count_trainable: ``count_trainable(shape, config) -> int``, the number of parameters ``apply`` would train
            on a model of that :class:`peftlab.models.shape.ModelShape` (computed from its config, nothing built);
            raises ``ConfigError`` where ``apply`` would. None: the method cannot count ahead.
        size_knob: the option that sets the method's size, or None when its count is fixed by the model.
        budget_note: ``budget_note(shape, config) -> str``, a remark for the budget table (e.g. what is left
            after training); None: no remark.
    """

    name: str
    config_cls: type
    apply: Callable[[nn.Module, Any], PeftMethod]
    summary: str
    default_lr: float
    paper: str = ""
    count_trainable: Callable[[Any, Any], int] | None = None
    size_knob: SizeKnob | None = None
    budget_note: Callable[[Any, Any], str] | None = None

    def build_config(self, options: dict[str, Any]) -> Any:
        """Instantiate the config from ``method.*`` options; an unknown key lists the valid ones."""
        valid = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join('method.' + k for k in unknown)} for method {self.name!r}; "
                f"valid: {', '.join('method.' + k for k in sorted(valid))}"
            )
        return self.config_cls(**coerce_fields(self.config_cls, options, "method"))


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (called from each method package's ``__init__``)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The spec registered under ``name``; an unknown name lists the registered ones."""
    if name not in _REGISTRY:
        raise ConfigError(f"method: unknown method {name!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def all_methods() -> list[MethodSpec]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def freeze_all(model: nn.Module) -> None:
    """Set ``requires_grad=False`` on every parameter (methods then unfreeze or add what they train)."""
    for p in model.parameters():
        p.requires_grad_(False)
