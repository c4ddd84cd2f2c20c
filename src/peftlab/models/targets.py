"""Which linear layers a ``target_modules`` option names: one resolver for built models and config-only shapes.

:func:`peftlab.models.arch.resolve_targets` (a built model) and :func:`peftlab.models.shape.resolve_target_shapes`
(the layout read from a config, for counting before anything is built) both list the model's linear layers in
module order and call :func:`resolve`, so the two can never disagree on what a name means.

Canonical target names ``q, k, v, o, gate, up, down`` (plus ``all-linear``) mean the same thing on every family,
so one config (``method.target_modules=[q, v]``) runs on GPT-2 and Llama alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol, TypeVar

from peftlab.options import ConfigError

CANONICAL_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
ALL_LINEAR = "all-linear"

# family -> canonical name -> (module path inside one transformer block, index of the output slice or None).
# GPT-2's fused c_attn computes [q | k | v] along its output columns, each d = hidden_size wide.
FAMILIES: dict[str, dict[str, tuple[str, int | None]]] = {
    "gpt2": {
        "q": ("attn.c_attn", 0),
        "k": ("attn.c_attn", 1),
        "v": ("attn.c_attn", 2),
        "o": ("attn.c_proj", None),
        "up": ("mlp.c_fc", None),
        "down": ("mlp.c_proj", None),
    },
    "llama": {
        "q": ("self_attn.q_proj", None),
        "k": ("self_attn.k_proj", None),
        "v": ("self_attn.v_proj", None),
        "o": ("self_attn.o_proj", None),
        "gate": ("mlp.gate_proj", None),
        "up": ("mlp.up_proj", None),
        "down": ("mlp.down_proj", None),
    },
}
FUSED_QKV_PARTS = 3

REGEX_CHARS = set("*+?[](){}|^$\\")


class Linear(Protocol):
    """What the resolver needs of a linear layer: its module path and widths."""

    name: str
    in_features: int
    out_features: int


class OutputWidth:
    """``out_size`` of a resolved target (a dataclass with ``out_features`` and ``out_slice``): what
    :class:`~peftlab.models.arch.TargetModule` and :class:`~peftlab.models.shape.TargetShape` compute alike."""

    out_features: int
    out_slice: tuple[int, int] | None

    @property
    def out_size(self) -> int:
        """Width of the targeted output: the slice's, or the whole module's."""
        return self.out_features if self.out_slice is None else self.out_slice[1] - self.out_slice[0]


L = TypeVar("L", bound=Linear)
# A resolved target: the layer, the canonical slice name (q/k/v of a fused layer) or None, and its output columns.
Resolved = tuple[L, str | None, tuple[int, int] | None]


def resolve(linears: Sequence[L], targets: list[str] | str, *, key: str, model_type: str, family: str | None,
            block_prefixes: Sequence[str]) -> list[Resolved]:
    """The layers (or output slices) that ``targets`` names, in model order.

    Args:
        linears: every linear layer of the model, in module order.
        targets: a list whose items are canonical names (``q k v o gate up down``), ``"all-linear"`` (every linear
            layer inside the transformer blocks; not the LM head) or exact module-name suffixes (``"c_attn"``,
            ``"mlp.c_proj"``, ``"lm_head"``); or one string. A string containing a regex character
            (``* + ? [ ] ( ) { } | ^ $ \\``) is a regex matched with ``re.fullmatch`` against full module names;
            any other string is a one-item list. On GPT-2, ``q``/``k``/``v`` are output slices of the fused
            ``c_attn``; ``"c_attn"`` (or a regex) targets the whole module, as PEFT does.
        key: config key named in error messages.
        model_type: ``config.model_type``, for messages.
        family: the naming family of :data:`FAMILIES` (None: canonical names match nothing).
        block_prefixes: the module path of every transformer block.

    Raises:
        ConfigError: an item matches nothing (the message lists the valid names), the list is empty, or a module is
            targeted both whole and as a slice.
    """
    if isinstance(targets, str):
        if REGEX_CHARS & set(targets):
            return _finish(linears, _match_regex(linears, targets, key, family, block_prefixes), key)
        targets = [targets]
    if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"{key}: expected a non-empty list of module names, got {targets!r}")
    found: dict[tuple[str, str | None], Resolved] = {}
    for item in targets:
        matches = _match_item(linears, item, family, block_prefixes)
        if not matches:
            raise ConfigError(f"{key}: {item!r} matches no linear layer of this {model_type} model; "
                              f"{valid_names(linears, family)}")
        for found_one in matches:
            found[(found_one[0].name, found_one[1])] = found_one
    return _finish(linears, found, key)


def valid_names(linears: Sequence[Linear], family: str | None) -> str:
    """A sentence listing what :func:`resolve` accepts (for error messages)."""
    canonical = [*FAMILIES[family], ALL_LINEAR] if family else [ALL_LINEAR]
    leaves = sorted({lin.name.rsplit(".", 1)[-1] for lin in linears})
    return (f"valid: canonical names {', '.join(canonical)}, module-name suffixes such as {', '.join(leaves)}, "
            f"or a regex string over full module names")


def _match_item(linears: Sequence[L], item: str, family: str | None,
                block_prefixes: Sequence[str]) -> list[Resolved]:
    if item == ALL_LINEAR:
        return [(lin, None, None) for lin in linears if any(lin.name.startswith(p + ".") for p in block_prefixes)]
    if item in CANONICAL_TARGETS:
        if family is None or item not in FAMILIES[family]:
            return []
        path, index = FAMILIES[family][item]
        by_name = {lin.name: lin for lin in linears}
        found: list[Resolved] = []
        for prefix in block_prefixes:
            layer = by_name[f"{prefix}.{path}"]
            if index is None:
                found.append((layer, None, None))
            else:  # one third of a fused [q | k | v] layer's output columns
                width = layer.out_features // FUSED_QKV_PARTS
                found.append((layer, item, (index * width, (index + 1) * width)))
        return found
    return [(lin, None, None) for lin in linears if lin.name == item or lin.name.endswith("." + item)]


def _match_regex(linears: Sequence[L], pattern: str, key: str, family: str | None,
                 block_prefixes: Sequence[str]) -> dict[tuple[str, str | None], Resolved]:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{key}: {pattern!r} is not a valid regex: {exc}") from exc
    found = {(lin.name, None): (lin, None, None) for lin in linears if regex.fullmatch(lin.name)}
    if not found:
        raise ConfigError(f"{key}: regex {pattern!r} fully matches no linear layer's name "
                          f"(e.g. {block_prefixes[0]}...); {valid_names(linears, family)}")
    return found


def _finish(linears: Sequence[L], found: dict[tuple[str, str | None], Resolved], key: str) -> list[Resolved]:
    whole = {name for name, part in found if part is None}
    overlap = sorted({name for name, part in found if part is not None and name in whole})
    if overlap:
        raise ConfigError(f"{key}: {overlap[0]} is targeted both whole and as q/k/v slices; choose one")
    order = {lin.name: i for i, lin in enumerate(linears)}
    return sorted(found.values(), key=lambda t: (order[t[0].name], t[2] or (0, 0)))
