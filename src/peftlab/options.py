"""Option helpers shared by the run config and every method's options: a leaf module (it imports nothing from
peftlab), so :mod:`peftlab.config`, :mod:`peftlab.registry` and the method folders can all build on it.

* :func:`opt` declares a dataclass field with its help text; :func:`check` / :func:`check_choice` raise
  :class:`ConfigError` naming the key.
* :func:`coerce_value` is the one place where a config value gets its field type (YAML reads ``1e-4`` as a string,
  the command line gives ``8.0`` for an int, ...).
* :class:`MethodOptions` is the base of every method's config dataclass: each field is coerced to its type once in
  ``__post_init__``, so the method's :meth:`MethodOptions.check` compares numbers with numbers and only checks ranges.
* :func:`check_module_names` is the one check of a "list of module names or one regex string" option.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import types
import typing
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key and the valid choices."""


def opt(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:  # noqa: A002
    """A dataclass field with a help string (``metadata['help']``)."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        value = default
        return field(default_factory=lambda: copy.deepcopy(value), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def check(condition: bool, key: str, message: str) -> None:
    """Raise ``ConfigError`` naming ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


def check_choice(value: Any, key: str, choices: list | tuple) -> None:
    """Raise ``ConfigError`` unless ``value`` is one of ``choices``; the message lists them."""
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")


# The words a type is named by in messages, and an example of a valid value.
_TYPE_WORDS: dict[Any, str] = {bool: "true or false", int: "an integer", float: "a number (e.g. 2e-4)",
                               str: "a string", type(None): "null"}


def _type_words(annotation: Any) -> str:
    """``float | None`` -> ``'a number (e.g. 2e-4) or null'``, ``list[str]`` -> ``'a list of strings ...'``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_words(arg) for arg in args)
    if origin is list:
        item = _type_words(args[0]).split(" (")[0].removeprefix("an ").removeprefix("a ") if args else "value"
        return f"a list of {item}s (e.g. [a, b])"
    if origin is dict or annotation is dict:
        return "a mapping (key: value)"
    return _TYPE_WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _number(value: Any) -> float | None:
    """``value`` as a finite number, or None. Strings are parsed: YAML 1.1 reads ``1e-4`` (no dot) as a string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    return None


class _NotThisType(Exception):
    """``value`` is not of one member of a union; the caller tries the next one, then names them all."""


def _coerce_plain(value: Any, annotation: Any, key: str) -> Any:
    """``value`` as the non-union type ``annotation``; ``_NotThisType`` if it is not one (a bad list item raises
    ``ConfigError`` naming the item)."""
    origin = typing.get_origin(annotation)
    number = _number(value)
    if annotation is Any:
        return value
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is float and number is not None:
        return float(number)
    if annotation is int and number is not None and float(number).is_integer():
        return int(number)
    if annotation is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)  # a name such as hub_config 3.0 or a folder called 2024
    if annotation is type(None) and value is None:
        return None
    if origin is list and isinstance(value, (list, tuple)):
        item = typing.get_args(annotation)[0] if typing.get_args(annotation) else Any
        return [coerce_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if (origin is dict or annotation is dict) and isinstance(value, dict):
        return value
    raise _NotThisType


def coerce_value(value: Any, annotation: Any, key: str) -> Any:
    """``value`` (from YAML, the command line or a stored result) as the field type ``annotation``.

    The one place where config values get their types, for every section and for method options alike, so the
    range checks after it can compare numbers with numbers.

    Raises:
        ConfigError: naming ``key``, the value and the expected type (``train.lr: expected a number ...``).
    """
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (
        annotation,)
    for member in members:
        with contextlib.suppress(_NotThisType):
            return _coerce_plain(value, member, key)
    shown = "null" if value is None else f"{value!r} ({type(value).__name__})"
    raise ConfigError(f"{key}: expected {_type_words(annotation)}, got {shown}")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce_fields(cls: type, values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Each of ``values`` coerced to the type of ``cls``'s field of that name (unknown names are left to the
    caller, which lists the valid ones); errors name ``prefix.key``."""
    types_ = field_types(cls)
    return {k: coerce_value(v, types_[k], f"{prefix}.{k}") if k in types_ else v for k, v in values.items()}


def check_module_names(value: Any, key: str, *, allow_empty: bool = False,
                       allow_none: bool = False) -> list[str] | str | None:
    """A target-module option (names or one regex string), checked; returns a list copy or the string.

    Raises:
        ConfigError: ``value`` is not a list of non-empty strings or a non-empty string (or is an empty list when
            ``allow_empty`` is False, or None when ``allow_none`` is False).
    """
    if value is None:
        check(allow_none, key, "must not be null")
        return None
    if isinstance(value, str):
        check(bool(value.strip()), key, "must not be empty")
        return value
    names_ok = isinstance(value, (list, tuple)) and all(isinstance(t, str) and t for t in value)
    if not names_ok or (not value and not allow_empty):
        raise ConfigError(f"{key}: expected a {'' if allow_empty else 'non-empty '}list of names (e.g. [q, v]) "
                          f"or a regex string, got {value!r}")
    return list(value)


class MethodOptions:
    """Base of a method's config dataclass (``@dataclass class LoraConfig(MethodOptions)``).

    ``__post_init__`` coerces every field to its annotated type (:func:`coerce_value`; errors name
    ``method.<field>``), then calls :meth:`check`, where the method checks ranges and relations between fields.
    """

    def __post_init__(self) -> None:
        hints = field_types(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            setattr(self, f.name, coerce_value(getattr(self, f.name), hints[f.name], f"method.{f.name}"))
        self.check()

    def check(self) -> None:
        """Raise :class:`ConfigError` naming ``method.<field>`` and the valid range on an invalid value."""
