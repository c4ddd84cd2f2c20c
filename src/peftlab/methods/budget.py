"""Equal-budget sizing: what each method trains on a model, and the size that fits a parameter budget.

Every method registers ``count_trainable(shape, config)`` (the exact number of parameters ``apply`` would train,
computed from the model's config alone: :mod:`peftlab.models.shape`) and, when it has one, the option that sets its
size (:class:`peftlab.methods.base.SizeKnob`: LoRA ``r``, prompt/prefix ``n_tokens``, the adapters'
``bottleneck_size``, intrinsic-dim ``d``, last-blocks ``n_blocks``). :func:`solve` picks the knob value whose count
is the largest not above the budget; :func:`budget_table` does it for every method
(``peftlab methods --budget 0.1% model=... method.target_modules=[q,v]``).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from peftlab.config import ConfigError, ModelConfig, parse_override
from peftlab.methods.base import MethodSpec, all_methods, get_method
from peftlab.models.shape import ModelShape, model_shape

# Count suffixes (case-insensitive): 2k = 2,000; 1.5M = 1,500,000; 1B (or 1G) = 10^9.
SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
_BUDGET = re.compile(r"^(?P<number>\d+(?:\.\d*)?|\.\d+)(?:e(?P<exp>[+-]?\d+))?(?P<suffix>[kmbg%]?)$", re.IGNORECASE)
BUDGET_FORMS = "a percentage of the model ('0.1%'), a count ('150000', '150_000') or a count with k/M/B ('2k', '1.5M')"
# Doublings of the knob before the search gives up (a knob whose count never reaches the budget is a bug).
_MAX_DOUBLINGS = 62


def parse_budget(text: str | int, total_params: int) -> int:
    """A parameter budget as a whole number of parameters.

    Args:
        text: ``"0.1%"`` (of ``total_params``, rounded down), ``"150000"``, ``"150_000"``, ``"1.5M"``, ``"2k"``,
            ``"1e5"``, or an int.
        total_params: the model's parameter count (for percentages).

    Returns:
        The budget, >= 1.

    Raises:
        ConfigError: ``text`` is not one of the forms above, a percentage is outside (0, 100], or the budget is
            below one parameter.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ConfigError(f"budget: expected {BUDGET_FORMS}, got {text!r}")
    raw = "".join(str(text).split()).replace("_", "").replace(",", "")  # "1 000", "2.5 %", "150_000"
    match = _BUDGET.match(raw)
    if not match:
        raise ConfigError(f"budget: {text!r} is not {BUDGET_FORMS}")
    value = Fraction(match["number"]) * Fraction(10) ** int(match["exp"] or 0)  # exact: no 0.1 * 3 rounding
    suffix = match["suffix"].lower()
    if suffix == "%":
        if not 0 < value <= 100:
            raise ConfigError(f"budget: {text!r} must be a percentage in (0, 100]")
        value = value * total_params / 100
    elif suffix:
        value *= SUFFIXES[suffix]
    budget = int(value)  # rounded down: the budget is a ceiling
    if budget < 1:
        raise ConfigError(f"budget: {text!r} is {float(value):g} parameters; it must be at least 1")
    return budget


@dataclass(frozen=True)
class Solution:
    """The size :func:`solve` chose for one method.

    Attributes:
        method: the method's name.
        options: the method options with the knob set (``options[knob] == value``), ready for ``build_config``.
        count: the exact number of trainable parameters with those options.
        knob: the size option, or None for a method whose count is fixed by the model (bitfit, full, ...).
        value: the knob's value, or None.
        fits: ``count <= budget``; False when even the smallest setting exceeds the budget.
        at_maximum: the knob stopped at its largest valid value (e.g. every block), not at the budget.
    """

    method: str
    options: dict[str, Any]
    count: int
    knob: str | None = None
    value: int | None = None
    fits: bool = True
    at_maximum: bool = False


def count_trainable(method: str | MethodSpec, shape: ModelShape, options: dict[str, Any] | None = None) -> int:
    """The exact number of parameters ``method`` with ``options`` trains on a model of ``shape`` (nothing built).

    Raises:
        ConfigError: the options are invalid, the method would refuse this model, or it cannot count ahead.
    """
    spec = get_method(method) if isinstance(method, str) else method
    if spec.count_trainable is None:
        raise ConfigError(f"method={spec.name}: this method cannot count its parameters from the model config")
    return spec.count_trainable(shape, spec.build_config(dict(options or {})))


def solve(method: str | MethodSpec, shape: ModelShape, budget: int, options: dict[str, Any] | None = None) -> Solution:
    """The knob value whose trainable count is the largest one not above ``budget``.

    The count grows with the knob, so the search doubles the step until the count exceeds the budget (or the
    knob reaches its maximum), then bisects: O(log value) counts, each computed from the shape.

    Args:
        method: a registered method name or spec.
        shape: the model's :class:`ModelShape`.
        budget: the largest acceptable number of trainable parameters.
        options: the other method options (a value for the knob itself is replaced).

    Returns:
        The :class:`Solution`; when the smallest knob value already exceeds the budget it is returned with
        ``fits=False``; a method without a knob reports its fixed count and whether it fits.

    Raises:
        ConfigError: the options are invalid or the method refuses this model (e.g. BitFit on a bias-free model).
    """
    spec = get_method(method) if isinstance(method, str) else method
    opts = dict(options or {})
    knob = spec.size_knob
    if knob is None:
        count = count_trainable(spec, shape, opts)
        return Solution(spec.name, opts, count, fits=count <= budget)
    for other in knob.replaces:
        opts.pop(other, None)

    def count_at(value: int) -> int:
        return count_trainable(spec, shape, {**opts, knob.option: value})

    good = knob.minimum
    good_count = count_at(good)
    if good_count > budget:
        return Solution(spec.name, {**opts, knob.option: good}, good_count, knob.option, good, fits=False)
    top = knob.maximum(shape, spec.build_config({**opts, knob.option: good})) if knob.maximum else None
    bad: int | None = None  # smallest value known to exceed the budget
    step = 1
    for _ in range(_MAX_DOUBLINGS):
        candidate = good + step if top is None else min(good + step, top)
        if candidate == good:  # reached the maximum
            break
        if count_at(candidate) > budget:
            bad = candidate
            break
        good, step = candidate, step * 2
    else:
        raise RuntimeError(f"{spec.name}: the count never exceeded {budget} as {knob.option} grew to {good}")
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if count_at(mid) <= budget else (good, mid)
    return Solution(spec.name, {**opts, knob.option: good}, count_at(good), knob.option, good,
                    at_maximum=bad is None and top is not None and good == top)


@dataclass(frozen=True)
class BudgetRow:
    """One line of the budget table; ``count`` is None when the method cannot run on the model (see ``note``)."""

    method: str
    setting: str
    count: int | None
    fits: bool
    note: str


@dataclass(frozen=True)
class BudgetTable:
    """Every method's size for one model and budget."""

    model: str
    shape: ModelShape
    budget_text: str
    budget: int
    rows: list[BudgetRow]


def method_options(specs: list[MethodSpec], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each method's share of ``options``: the keys its config has (``target_modules`` goes to LoRA, IA3 and
    intrinsic-dim alike).

    Raises:
        ConfigError: a key belongs to none of ``specs`` (the message lists the valid keys).
    """
    fields = {spec.name: {f.name for f in dataclasses.fields(spec.config_cls)} for spec in specs}
    unknown = sorted(k for k in options if not any(k in names for names in fields.values()))
    if unknown:
        valid = sorted(set().union(*fields.values()))
        raise ConfigError(f"unknown option(s) {', '.join('method.' + k for k in unknown)} for the methods "
                          f"{', '.join(fields)}; valid: {', '.join('method.' + k for k in valid)}")
    return {name: {k: v for k, v in options.items() if k in names} for name, names in fields.items()}


def budget_rows(shape: ModelShape, budget: int, options: dict[str, Any] | None = None,
                methods: list[str] | None = None) -> list[BudgetRow]:
    """One :class:`BudgetRow` per method (every registered one by default).

    A method that refuses the model or the options (BitFit on Llama, a target that does not exist) or cannot
    count from the config gets a row with ``count=None`` and the reason as its note.
    """
    specs = [get_method(m) for m in methods] if methods else all_methods()
    per_method = method_options(specs, dict(options or {}))
    rows = []
    for spec in specs:
        try:
            sol = solve(spec, shape, budget, per_method[spec.name])
            note = _note(spec, shape, sol)
        except ConfigError as exc:
            rows.append(BudgetRow(spec.name, "", None, False, f"n/a: {exc}"))
            continue
        setting = f"{sol.knob}={sol.value}" if sol.knob else "(fixed)"
        rows.append(BudgetRow(spec.name, setting, sol.count, sol.fits, note))
    return rows


def _note(spec: MethodSpec, shape: ModelShape, sol: Solution) -> str:
    parts = []
    if sol.knob and not sol.fits:
        parts.append(f"smallest {sol.knob} exceeds the budget")
    if sol.at_maximum:
        parts.append(f"{sol.knob} at its maximum")
    if spec.budget_note is not None:
        text = spec.budget_note(shape, spec.build_config(sol.options))
        if text:
            parts.append(text)
    return "; ".join(parts)


def budget_table(model: str, budget: str, overrides: list[str] | None = None) -> BudgetTable:
    """Read ``model``'s config (no weights), parse ``budget`` and size every method.

    Args:
        model: ``model.name`` (hub id, local folder, .gguf file or ``smollm2-135m``).
        budget: see :func:`parse_budget`.
        overrides: ``method=NAME`` or ``method=[a, b]`` (only those methods) and ``method.<key>=value`` (given to
            every method whose config has the key).

    Raises:
        ConfigError: a bad budget or override; ModelNotFoundError: the model's config cannot be found.
    """
    from peftlab.models.loading import load_model_config  # transformers' loaders only when a table is asked for

    methods, options = _parse_overrides(overrides or [])
    shape = model_shape(load_model_config(ModelConfig(name=model)))
    count = parse_budget(budget, shape.total_params)
    return BudgetTable(model, shape, str(budget), count, budget_rows(shape, count, options, methods))


def _parse_overrides(overrides: list[str]) -> tuple[list[str] | None, dict[str, Any]]:
    methods: list[str] | None = None
    options: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        if key in ("method", "method.name"):
            methods = [str(v) for v in value] if isinstance(value, list) else [str(value)]
            for name in methods:
                get_method(name)  # an unknown name lists the registered ones
        elif key.startswith("method.") and key.count(".") == 1:
            options[key.split(".", 1)[1]] = value
        else:
            raise ConfigError(f"{text!r}: --budget takes model=NAME, method=NAME[S] and method.<option>=value")
    return methods, options


def format_budget_table(table: BudgetTable) -> str:
    """The table as text: a header with the model and budget, then one line per method."""
    s = table.shape
    head = "tied" if s.tied else "untied"
    lines = [
        f"model {table.model}: {s.model_type}, {s.total_params:,} parameters ({s.num_layers} layers, "
        f"d={s.hidden_size}, {head} head)",
        f"budget {table.budget_text} = {table.budget:,} trainable parameters",
        "",
        f"{'method':<24} {'setting':<20} {'trainable':>13} {'% model':>9}  {'fits':<4}  note",
    ]
    for row in table.rows:
        if row.count is None:
            lines.append(f"{row.method:<24} {'-':<20} {'-':>13} {'-':>9}  {'-':<4}  {row.note}")
            continue
        share = 100 * row.count / s.total_params
        lines.append(f"{row.method:<24} {row.setting:<20} {row.count:>13,} {share:>8.4f}%  "
                     f"{'yes' if row.fits else 'NO':<4}  {row.note}".rstrip())
    return "\n".join(lines)


def add_budget_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--budget`` and the ``key=value`` arguments it takes to ``peftlab methods``'s parser."""
    parser.add_argument("--budget", default=None, metavar="BUDGET",
                        help="size every method to this many trainable parameters: " + BUDGET_FORMS.replace("%", "%%"))
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="with --budget: model=NAME (default smollm2-135m), method=NAME or method=[a,b] "
                             "(only those), method.<option>=value (e.g. method.target_modules=[q,v])")


def print_budget(ns: argparse.Namespace) -> int:
    """Print the budget table for ``ns.budget`` and ``ns.overrides`` (from :func:`add_budget_argument`).

    Returns:
        0 (errors raise ``ConfigError`` / ``ModelNotFoundError`` for the CLI to report).
    """
    if ns.budget is None:
        raise ConfigError("key=value arguments of `peftlab methods` need --budget (e.g. --budget 0.1%)")
    model = ModelConfig().name
    rest = []
    for text in ns.overrides:
        key, value = parse_override(text)
        if key in ("model", "model.name"):
            model = str(value)
        else:
            rest.append(text)
    print(format_budget_table(budget_table(model, ns.budget, rest)))
    return 0
