"""The grid file of `peftlab compare`: parse it strictly, apply overrides, and expand it into validated runs.

A grid is one YAML file (see ``configs/compare/``)::

    name: demo                 # results go to <results>/<name>/ (default: task.name)
    model: {name: smollm2-135m}
    task: {name: table-to-text}
    data: {path: demo}
    train: {max_steps: 20}     # model/task/data/train/eval: the shared RunConfig sections, as in configs/*.yaml
    eval: {max_new_tokens: 48}
    methods:
      - last-layer                                   # a bare name: the method's defaults
      - name: lora
        options: {r: 8}                              # fixed method options
        variants: {dropout: [0, 0.1]}                # cartesian product; dotted keys (train.lr) set RunConfig keys
        overrides: {train.lr: 3.0e-4}                # dotted RunConfig keys for this method's runs only
      - name: ia3
        n_train: [500]                               # this method only at these sizes (default: the grid's)
    n_train: [50, 500]         # data.max_train per run; null or "all": every training example
    seeds: [0, 1]              # train.seed and data.seed
    budget: null               # or "0.1%" / 150000: size every method to this many trainable parameters
    baselines: true            # zero-shot base model (+ lead-3 for summarization)
    lr_pilot: null             # or {factors: [0.3, 1, 3], steps: 30, validation: 100, per: method}: see below
    results: results

Learning rate per method (``lr_pilot``): each method entry (``per: method``, the default; its first variant) or
each (method, variant) (``per: variant``) first trains short pilots, one per candidate learning rate (``factor`` x
the lr the run would use: its ``train.lr``, or the method's default), for ``steps`` optimizer steps on the entry's
largest training set with the grid's first seed, and scores each by the validation loss on ``validation``
examples. When the best candidate is the largest (smallest) factor tried, one more pilot goes a step further out (the
ratio between the two outermost factors), up to ``extend`` times (default 2), so that the choice is not just the edge
of a range set too narrow. Every run of the group then trains at the candidate with the lowest loss (ties: the
factor nearest 1); a diverged pilot (non-finite loss) loses. Pilots write
``<results>/<name>/pilots/<stem>.json``; each run's ``grid.lr_pilot`` record says what was tried and chosen.

Precedence, lowest first: dataclass defaults, the shared sections, command-line overrides of the shared sections,
the method's ``options`` and ``overrides``, its variant, then the grid's own ``n_train``/``seeds``/``budget``.
Every run's config is built and validated here, before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.config import PRIMARY_FIELD, ConfigError, RunConfig, config_from_dict, parse_override, read_yaml_mapping

SHARED_SECTIONS = ("model", "task", "data", "train", "eval")
GRID_KEYS = ("name", "methods", "n_train", "seeds", "budget", "baselines", "lr_pilot", "results")
PILOT_KEYS = ("factors", "steps", "validation", "per", "extend")
PILOT_PER = ("method", "variant")
ENTRY_KEYS = ("name", "options", "variants", "overrides", "n_train")
# RunConfig keys a grid sets itself: a grid file or override naming them is an error with this hint.
OWNED_BY_GRID = {"method": "use the methods: list", "out": "runs go under results/<name>/runs/",
                 "resume": "interrupted runs are resumed automatically", "adapter": "use peftlab eval"}
ZERO_SHOT, LEAD_3, PILOT = "zero-shot", "lead-3", "pilot"
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=%-]")


@dataclass
class MethodEntry:
    """One item of ``methods:``: a method, its fixed options, its variant lists and per-method overrides."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, list[Any]] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    n_train: list[int | None] | None = None  # None: the grid's n_train
    where: str = ""  # "grid.yaml: methods[2]" for messages


@dataclass
class LrPilot:
    """``lr_pilot:`` of a grid: candidate factors of each method's learning rate, pilot length and validation size."""

    factors: list[float]
    steps: int = 30
    validation: int | None = 100
    per: str = "method"  # one learning rate per method entry, or per (method entry, variant)
    extend: int = 2  # extra pilots past the edge when the best rate is the largest or smallest tried


@dataclass
class GridSpec:
    """A parsed grid file with command-line overrides applied (nothing validated against methods yet)."""

    source: str
    shared: dict[str, Any]  # {section: {key: value}}: the file's sections with command-line overrides merged in
    methods: list[MethodEntry]
    n_train: list[int | None]
    seeds: list[int]
    budget: str | int | None
    baselines: bool
    results: str
    name: str
    lr_pilot: LrPilot | None = None


@dataclass
class PlannedRun:
    """One run of the grid: its validated config, where it writes, and the ``grid`` record of its result."""

    stem: str
    kind: str  # "train" | "zero-shot" | "lead-3" | "pilot"
    cfg: RunConfig
    grid: dict[str, Any]
    result_path: Path
    run_dir: Path
    # lr_pilot: the (method, variant) group whose pilots set this run's learning rate (train and pilot runs)
    pilot_group: str | None = None


def _unknown(where: str, key: str, valid: list[str] | tuple[str, ...], hint: str = "") -> ConfigError:
    near = difflib.get_close_matches(key, list(valid), n=1)
    near_text = f" (did you mean {near[0]!r}?)" if near else ""
    return ConfigError(f"{where}: unknown key {key!r}{near_text}; valid keys: {', '.join(valid)}{hint}")


def _as_list(value: Any) -> list[Any]:
    """A scalar (``seeds: 0``, ``seeds=3`` on the command line) stands for a one-item list."""
    if value is None:
        return [None]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _n_train(values: Any, where: str) -> list[int | None]:
    out: list[int | None] = []
    for v in _as_list(values):
        if v is None or v == "all":
            out.append(None)
        elif isinstance(v, int) and not isinstance(v, bool) and v > 0:
            out.append(v)
        else:
            raise ConfigError(f"{where}: n_train entries must be integers > 0, null or 'all'; got {v!r}")
    return out


def _seeds(values: Any, where: str) -> list[int]:
    seeds = _as_list(values)
    for s in seeds:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise ConfigError(f"{where}: seeds must be integers >= 0; got {s!r}")
    return seeds


def _positive_int(value: Any, where: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{where}: must be an integer > 0{' or null' if allow_none else ''}; got {value!r}")
    return value


def _lr_pilot(value: Any, where: str) -> LrPilot | None:
    """``lr_pilot: null | {factors: [...], steps: N, validation: N}``, checked key by key."""
    if value is None or value is False:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be null or a mapping with keys {', '.join(PILOT_KEYS)} "
                          "(e.g. {factors: [0.3, 1, 3], steps: 30, validation: 100})")
    for key in value:
        if key not in PILOT_KEYS:
            raise _unknown(where, str(key), PILOT_KEYS)
    factors = value.get("factors", [0.3, 1, 3])
    if (not isinstance(factors, list) or not factors
            or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0 for f in factors)):
        raise ConfigError(f"{where}.factors: must be a non-empty list of numbers > 0 (multiples of each method's "
                          f"learning rate); got {factors!r}")
    if len(set(factors)) != len(factors):
        raise ConfigError(f"{where}.factors: {factors!r} repeats a value")
    per = value.get("per", "method")
    if per not in PILOT_PER:
        raise ConfigError(f"{where}.per: {per!r} is not one of {', '.join(map(repr, PILOT_PER))}")
    extend = value.get("extend", 2)
    if not isinstance(extend, int) or isinstance(extend, bool) or extend < 0:
        raise ConfigError(f"{where}.extend: must be an integer >= 0 (extra pilots past the edge); got {extend!r}")
    return LrPilot(factors=[float(f) for f in factors],
                   steps=_positive_int(value.get("steps", 30), f"{where}.steps"),
                   validation=_positive_int(value.get("validation", 100), f"{where}.validation", allow_none=True),
                   per=per, extend=extend)


def _check_run_key(key: str, where: str) -> None:
    """A RunConfig key a grid may set: in a shared section (``train.lr``, ``task``), never method/out/..."""
    head = key.split(".")[0]
    if head in OWNED_BY_GRID:
        raise ConfigError(f"{where}: {key!r} cannot be set in a grid ({OWNED_BY_GRID[head]})")
    if head not in SHARED_SECTIONS:
        raise _unknown(where, key, [*GRID_KEYS, *SHARED_SECTIONS], " (or section.key, e.g. train.lr)")


def _method_entry(item: Any, where: str) -> MethodEntry:
    if isinstance(item, str):
        return MethodEntry(name=item, where=where)
    if not isinstance(item, dict) or "name" not in item:
        raise ConfigError(f"{where}: a method is a name or a mapping with name: (and options/variants/overrides)")
    for key in item:
        if key not in ENTRY_KEYS:
            raise _unknown(where, str(key), ENTRY_KEYS, " (method options go under options:)")
    entry = MethodEntry(name=str(item["name"]), where=f"{where} ({item['name']})")
    for key in ("options", "variants", "overrides"):
        value = item.get(key) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{entry.where}: {key} must be a mapping")
        setattr(entry, key, dict(value))
    if "n_train" in item:
        entry.n_train = _n_train(item["n_train"], f"{entry.where}: n_train")
    for key, values in entry.variants.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{entry.where}: variants.{key} must be a non-empty list of values")
    dotted = [str(k) for k in entry.variants if "." in str(k)]
    for key, what in [*((k, "variants") for k in dotted), *((str(k), "overrides") for k in entry.overrides)]:
        _check_run_key(key, f"{entry.where}: {what}")
        if key.split(".")[0] == "model":  # budget sizing and the baselines assume one base model
            raise ConfigError(f"{entry.where}: {what}: {key!r}: a grid compares methods on one model; "
                              "set model: at the top level (one grid file per model)")
    return entry


def _nested(key: str, value: Any) -> dict[str, Any]:
    """``train.lr: v`` -> ``{train: {lr: v}}``; ``task: summarization`` -> ``{task: {name: summarization}}``."""
    head, _, rest = key.partition(".")
    if rest:
        return {head: {rest: value}}
    if head in PRIMARY_FIELD and not isinstance(value, dict):
        return {head: {PRIMARY_FIELD[head]: value}}
    return {head: value}


def merge_settings(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """``layer`` (sections or dotted keys) merged over ``base`` section by section; later keys win.

    Both are RunConfig settings; the result is ``{section: {key: value}}`` for :func:`config_from_dict`.
    """
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in layer.items():
        for head, part in _nested(str(key), value).items():
            if isinstance(part, dict) and isinstance(merged.get(head), dict):
                merged[head] = {**merged[head], **part}
            else:
                merged[head] = dict(part) if isinstance(part, dict) else part
    return merged


def parse_grid(data: dict[str, Any], source: str = "<grid>", overrides: list[str] | None = None) -> GridSpec:
    """Check the keys of a grid mapping, apply ``key=value`` overrides, and return the :class:`GridSpec`.

    Args:
        data: the parsed YAML mapping.
        source: the file name, used in every error message.
        overrides: command-line ``key=value`` items: a grid key (``seeds=[0]``) replaces it; a RunConfig key
            (``train.max_steps=20``) sets the shared sections.

    Raises:
        ConfigError: an unknown or misplaced key, or a malformed value; the message names the file and key.
    """
    grid: dict[str, Any] = {}
    shared: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        if key in GRID_KEYS:
            grid[key] = value
        else:
            _check_run_key(key, source)
            shared = merge_settings(shared, {key: value})
    for text in overrides or []:
        key, value = parse_override(text)
        if key in GRID_KEYS:
            grid[key] = value
        else:
            _check_run_key(key, f"override {text!r}")
            try:
                config_from_dict({key: value})  # an unknown key is reported as the override's, not the file's
            except ConfigError as exc:
                raise ConfigError(f"override {text!r}: {exc}") from exc
            shared = merge_settings(shared, {key: value})
    methods = grid.get("methods") or []
    if not isinstance(methods, list):
        raise ConfigError(f"{source}: methods must be a list of method names or mappings")
    entries = [_method_entry(m, f"{source}: methods[{i}]") for i, m in enumerate(methods)]
    budget = grid.get("budget")
    if isinstance(budget, bool) or (budget is not None and not isinstance(budget, (str, int))):
        raise ConfigError(f"{source}: budget must be null, a parameter count (150000) or a percentage ('0.1%')")
    baselines = grid.get("baselines", True)
    if not isinstance(baselines, bool):
        raise ConfigError(f"{source}: baselines must be true or false")
    try:
        base = config_from_dict(shared)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    name = str(grid.get("name") or base.task.name)
    if _UNSAFE.search(name):
        raise ConfigError(f"{source}: name {name!r} may hold only letters, digits and . _ + = % -")
    n_train = _n_train(grid["n_train"], f"{source}: n_train") if "n_train" in grid else [base.data.max_train]
    return GridSpec(source=source, shared=shared, methods=entries, n_train=n_train,
                    seeds=_seeds(grid.get("seeds", [0]), f"{source}: seeds"), budget=budget, baselines=baselines,
                    results=str(grid.get("results") or "results"), name=name,
                    lr_pilot=_lr_pilot(grid.get("lr_pilot"), f"{source}: lr_pilot"))


def load_grid(path: str | Path, overrides: list[str] | None = None) -> GridSpec:
    """Read a grid YAML file and apply command-line overrides (see :func:`parse_grid`)."""
    path = Path(path)
    data = read_yaml_mapping(path, "grid file", f"a mapping (keys: {', '.join(GRID_KEYS)}, sections)")
    return parse_grid(data, str(path), overrides)


def format_value(value: Any) -> str:
    """A variant value as label text: ``0.1``, ``true``, ``null``, ``q+v`` for a list."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "+".join(format_value(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def variant_label(assignment: dict[str, Any]) -> str:
    """``default`` for no variant, else ``key=value`` joined by ``,`` (unsafe filename characters become ``_``)."""
    if not assignment:
        return "default"
    return ",".join(_UNSAFE.sub("_", f"{k}={format_value(v)}") for k, v in assignment.items())


def run_stem(method: str, variant: str, n_train: int | None, seed: int) -> str:
    """``<method>--<variant>--n<N>--seed<k>`` (``nall``: every training example)."""
    return f"{method}--{variant}--n{'all' if n_train is None else n_train}--seed{seed}"


def _variants(entry: MethodEntry) -> list[dict[str, Any]]:
    keys = list(entry.variants)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(entry.variants[k] for k in keys))]


# (method name, model shape, budget in parameters, options) -> (sized options, facts for the grid record such as
# the planned trainable count); see peftlab.methods.budget and compare.plan.
BudgetSolver = Callable[[str, Any, int, dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]


def _build(spec: GridSpec, entry: MethodEntry | None, assignment: dict[str, Any], n: int | None, seed: int,
           out: Path, sized: dict[str, Any] | None = None) -> RunConfig:
    """The run's config, in precedence order (see the module docstring), validated."""
    data = spec.shared
    if entry is not None:
        options = {**entry.options, **{k: v for k, v in assignment.items() if "." not in k}}
        data = merge_settings(data, {"method": {"name": entry.name,
                                                "options": sized if sized is not None else options}})
        data = merge_settings(data, entry.overrides)
        data = merge_settings(data, {k: v for k, v in assignment.items() if "." in k})
        data = merge_settings(data, {"data.max_train": n, "train.seed": seed, "data.seed": seed})
    data = merge_settings(data, {"out": str(out)})
    cfg = config_from_dict(data)
    cfg.validate()
    return cfg


def _planned(spec: GridSpec, kind: str, stem: str, cfg: RunConfig, record: dict[str, Any],
             group: str | None = None) -> PlannedRun:
    root = Path(spec.results) / spec.name
    if kind == PILOT:  # apart from the runs, so that reports never take a pilot for a result
        root = root / "pilots"
    return PlannedRun(stem=stem, kind=kind, cfg=cfg, grid={**record, "stem": stem},
                      result_path=root / f"{stem}.json",
                      run_dir=root / stem if kind == PILOT else root / "runs" / stem, pilot_group=group)


def base_lr(cfg: RunConfig) -> float:
    """The learning rate a run trains at without a pilot: ``train.lr``, or its method's default."""
    from peftlab.methods import get_method  # the registry lives above config

    return float(cfg.train.lr or get_method(cfg.method.name).default_lr)


def _pilot_runs(spec: GridSpec, group: str, train_cfg: RunConfig, pilot_out: Path,
                record: dict[str, Any]) -> list[PlannedRun]:
    """One short pilot per candidate learning rate for the runs of ``group`` (see the module docstring)."""
    assert spec.lr_pilot is not None
    runs = []
    for factor in spec.lr_pilot.factors:
        lr = factor * base_lr(train_cfg)
        stem = f"{PILOT}--{group}--lr{lr:.3g}"
        data = dataclasses.replace(train_cfg.data, max_validation=spec.lr_pilot.validation)
        train = dataclasses.replace(train_cfg.train, lr=lr, max_steps=spec.lr_pilot.steps, eval_every=0, patience=0)
        evaluation = dataclasses.replace(train_cfg.eval, splits=[], forgetting_data=None)
        cfg = dataclasses.replace(train_cfg, data=data, train=train, eval=evaluation, out=str(pilot_out / stem))
        cfg.validate()
        runs.append(_planned(spec, PILOT, stem, cfg, {**record, "lr": lr, "factor": factor,
                                                      "extend": spec.lr_pilot.extend}, group))
    return runs


def _baselines(spec: GridSpec) -> list[PlannedRun]:
    runs: list[PlannedRun] = []
    if not spec.baselines:
        return runs
    root = Path(spec.results) / spec.name / "runs"
    for kind in (ZERO_SHOT, LEAD_3):
        stem = run_stem(kind, "default", 0, 0)
        cfg = _build(spec, None, {}, None, 0, root / run_stem(ZERO_SHOT, "default", 0, 0))
        if kind == LEAD_3 and cfg.task.name != "summarization":
            continue
        record = {"method": kind, "variant": "default", "n_train": 0, "seed": 0, "budget": None}
        runs.append(_planned(spec, kind, stem, cfg, record))
    return runs


def _check_distinct(cfg: RunConfig, where: str, configs: dict[str, str]) -> None:
    """Two differently named runs with identical settings would waste a run and mislead a report."""
    key = repr(sorted(_flatten({**cfg.to_dict(), "out": None}).items()))
    if key in configs:
        raise ConfigError(f"{where}: has the same settings as {configs[key]} (in budget mode the size option, e.g. "
                          "r or n_tokens, is set by the budget, so varying it makes no difference)")
    configs[key] = where


def expand_grid(spec: GridSpec, solver: BudgetSolver | None = None, shape: Any = None,
                budget_params: int | None = None) -> list[PlannedRun]:
    """Every run of the grid (baselines first, then by n_train, seed, method, variant), each config validated.

    Args:
        spec: the parsed grid.
        solver: sizes a method to ``budget_params`` (budget mode only; see :mod:`peftlab.methods.budget`).
        shape: the model shape the solver needs.
        budget_params: the budget in trainable parameters (``spec.budget`` resolved against the model).

    Raises:
        ConfigError: a run's config is invalid (the message names the method entry and variant), or two runs
            would write the same file.
    """
    runs = _baselines(spec)
    n_baselines = len(runs)
    pilots: list[PlannedRun] = []
    seen: dict[str, str] = {}
    configs: dict[str, str] = {}
    sizes = list(dict.fromkeys([*spec.n_train, *(n for e in spec.methods for n in e.n_train or [])]))
    names = [e.name for e in spec.methods]
    for n, seed, (index, entry) in itertools.product(sizes, spec.seeds, enumerate(spec.methods)):
        entry_sizes = entry.n_train if entry.n_train is not None else spec.n_train
        if n not in entry_sizes:
            continue
        # Pilots run on the entry's largest training set ("all" is the largest) with the first seed.
        pilot_n = None if None in entry_sizes else max(m for m in entry_sizes if m is not None)
        for number, assignment in enumerate(_variants(entry)):
            label = variant_label(assignment)
            stem = run_stem(entry.name, label, n, seed)
            where = f"{entry.where}, variant {label}"
            if stem in seen:
                raise ConfigError(f"{where}: run {stem!r} is also produced by {seen[stem]}; put the options that "
                                  "differ under variants: so that the runs get different names")
            seen[stem] = where
            out = Path(spec.results) / spec.name / "runs" / stem
            record: dict[str, Any] = {"method": entry.name, "variant": label, "n_train": n, "seed": seed,
                                      "budget": spec.budget}
            try:
                sized = None
                if spec.budget is not None:
                    if solver is None or budget_params is None:
                        raise ConfigError("budget mode needs a budget solver (peftlab.methods.budget)")
                    options = {**entry.options, **{k: v for k, v in assignment.items() if "." not in k}}
                    sized, facts = solver(entry.name, shape, budget_params, options)
                    record.update(budget_params=budget_params, **facts)
                cfg = _build(spec, entry, assignment, n, seed, out, sized)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from exc
            _check_distinct(cfg, where, configs)
            group = None
            if spec.lr_pilot is not None:
                group = entry.name if names.count(entry.name) == 1 else f"{entry.name}.{index + 1}"
                group = f"{group}--{label}" if spec.lr_pilot.per == "variant" else group
            first_variant = number == 0 or spec.lr_pilot is None or spec.lr_pilot.per == "variant"
            if group is not None and n == pilot_n and seed == spec.seeds[0] and first_variant:
                pilot_record = {**record, "n_train": n, "seed": seed}
                pilots += _pilot_runs(spec, group, cfg, Path(spec.results) / spec.name / "pilots", pilot_record)
            runs.append(_planned(spec, "train", stem, cfg, record, group))
    runs[n_baselines:n_baselines] = pilots  # after the baselines, before any training run
    if not runs:
        raise ConfigError(f"{spec.source}: the grid has no runs (methods: is empty and baselines: false)")
    return runs


# Keys that do not change a run's numbers: a finished run recorded with other values still counts as done.
IGNORED_KEYS = ("out", "resume", "adapter", "train.device", "eval.show_examples", "train.log_every")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _with_resolved_options(config: dict[str, Any]) -> dict[str, Any]:
    """The method options with the method's defaults filled in (``r: 8`` given or not is the same run)."""
    from peftlab.methods import get_method  # the registry lives above config

    method = config["method"]
    options = dataclasses.asdict(get_method(method["name"]).build_config(method["options"]))
    return {**config, "method": {"name": method["name"], "options": options}}


def _matters_for_evaluation(key: str) -> bool:
    """Settings a zero-shot evaluation depends on: not training (but bf16 autocast), method or training subset."""
    if key.startswith("train."):
        return key == "train.bf16"
    return not key.startswith("method.") and key not in ("data.max_train", "data.seed")


def config_differences(recorded: dict[str, Any], planned: RunConfig, evaluation_only: bool = False,
                       ignore: tuple[str, ...] = ()) -> list[str]:
    """``key: recorded -> planned`` for each setting that differs (ignoring :data:`IGNORED_KEYS` and ``ignore``).

    ``evaluation_only``: compare only what an evaluation without training depends on (the baselines).
    """
    # Round-trip the recorded config so that defaults added since it was written compare equal.
    try:
        old = _flatten(_with_resolved_options(dataclasses.asdict(config_from_dict(recorded))))
    except (ConfigError, TypeError) as exc:
        return [f"unreadable recorded config ({exc})"]
    new = _flatten(_with_resolved_options(planned.to_dict()))
    keys = sorted(set(old) | set(new))
    if evaluation_only:
        keys = [k for k in keys if _matters_for_evaluation(k)]
    if new.get("train.max_steps") is not None and old.get("train.max_steps") == new["train.max_steps"]:
        # A run of a fixed number of steps (an lr pilot) never reads how many epochs or minimum steps a full run
        # would take: the trainer's schedule is max_steps alone, so a grid may change those without redoing it.
        ignore = (*ignore, "train.epochs", "train.min_steps")
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys
            if k not in IGNORED_KEYS and k not in ignore and old.get(k) != new.get(k)]
