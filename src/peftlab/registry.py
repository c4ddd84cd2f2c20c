"""The method registry: a leaf module that the run config, the budget solver and the interop code look methods up in.

A method is one folder ``peftlab/methods/<name>/`` whose ``__init__.py`` calls :func:`register` with a
:class:`MethodSpec`. Nothing imports the folders by name: the first lookup (:func:`get_method`, :func:`all_methods`)
imports every sub-package of :mod:`peftlab.methods` (:func:`peftlab.methods.discover`), so a new folder is found
without touching an import list, and :mod:`peftlab.config` can check ``method.*`` options without importing the
methods at import time.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peftlab.options import ConfigError, coerce_fields


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
    """A registered method: everything the core, the budget solver and the interop code may ask of it.

    Attributes:
        name: the name used in configs (``method=lora``).
        config_cls: the method's config dataclass (a :class:`peftlab.options.MethodOptions`); it raises
            ``ConfigError`` on bad values.
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
        peft: the method's Hugging Face PEFT converter (:class:`peftlab.interop.peft_format.PeftConverter`), or
            None when PEFT has no equivalent; then ``no_peft`` says why.
        no_peft: why the method has no PEFT converter (shown when an export is refused).
        merge_rule: how ``merge()`` folds the method into the base weights (e.g. ``"W += s B A"``); empty when the
            method has no merged form. ``peftlab merge`` lists the methods that have one.
    """

    name: str
    config_cls: type
    apply: Callable[[Any, Any], Any]
    summary: str
    default_lr: float
    paper: str = ""
    count_trainable: Callable[[Any, Any], int] | None = None
    size_knob: SizeKnob | None = None
    budget_note: Callable[[Any, Any], str] | None = None
    peft: Any = None
    no_peft: str = ""
    merge_rule: str = ""

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
_discovered = False


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (called from each method package's ``__init__``).

    Raises:
        ValueError: the name is taken, or the spec says neither how to convert to PEFT nor why it cannot.
    """
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is registered twice")
    if spec.peft is None and not spec.no_peft:
        raise ValueError(f"method {spec.name!r}: give a PEFT converter (peft=...) or the reason there is none "
                         f"(no_peft=...)")
    _REGISTRY[spec.name] = spec
    return spec


def _discover() -> None:
    """Import every method folder once (they register themselves)."""
    global _discovered
    if _discovered:
        return
    _discovered = True  # first: a method folder that looks a method up while it is imported must not recurse
    try:
        importlib.import_module("peftlab.methods").discover()
    except BaseException:
        _discovered = False
        raise


def get_method(name: str) -> MethodSpec:
    """The spec registered under ``name``; an unknown name lists the registered ones."""
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(f"method: unknown method {name!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def all_methods() -> list[MethodSpec]:
    """Every registered method, sorted by name."""
    _discover()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
