"""The result of one run as one typed record, with its one writer and its one reader.

A run's result lives in ``<out>/result.json`` (``peftlab train`` / ``eval``) and, with the grid cell it ran as, in
``<results>/<name>/<stem>.json`` (``peftlab compare``). Everything that writes such a file builds a
:class:`ResultRecord` and calls :func:`write_result` (indented JSON, written atomically and durably: a file that
exists is complete); everything that reads one calls :func:`read_result` and names fields
(``record.train_info.trainable_params``) instead of walking dictionaries. Reports are built only from these files.

Schema (``schema_version`` 1)::

    kind:        "train" | "eval" | "baseline" (lead-3, derived from the zero-shot run) | "pilot" (a learning-rate
                 pilot whose loss went non-finite, with ``diverged`` saying how)
    run_info:    command, config (fully resolved), versions, machine, seed, git commit, started/finished
    train_info:  method facts, trainable/total params and %, time per epoch and in all, train tokens/s,
                 eval examples/s, peak memory bytes (+ how it was measured), estimated training FLOPs,
                 adapter bytes, loss curve, validation curve, best/early-stop step, forgetting
    metrics:     {split: {metric: value, n_examples}}, plus baselines (e.g. lead-3) under metrics[split]["baselines"]
    samples:     {split: [{id, source, prediction, references}]}  (a few generated outputs)
    per_example: {split: {ids: [example id, ...], <record>: ..., baselines: {name: {<record>: ...}}}}, what a
                 paired significance test needs (peftlab.lab.significance), one value per example in ``ids``
                 order: classification ``predicted``/``gold`` label indices into ``labels``; summarization
                 ``rouge1/rouge2/rougeL/rougeLsum`` F1 x100; table-to-text ``bleu_stats`` (sacrebleu's
                 [sys_len, ref_len, correct1..4, total1..4]) and ``rougeL``. Numeric records are packed as one
                 string of space-separated numbers (``;`` between examples' BLEU rows; peftlab.tasks.base
                 pack_records / unpack_numbers) to keep indented JSON small.
    grid:        the cell ``peftlab compare`` ran it as: method, variant, n_train, seed, budget, stem, and where
                 they apply the budget sizing, the pilot's rate and the ``lr_pilot`` choice

Reading old files: version 1 has grown by fields (``per_example``, ``forgetting``, ``trunk_cache``,
``world_size``, ``train_trunk_tokens``, ...); a file written before a field existed reads it as None, and a
baseline file may hold ``metrics`` alone. Keys the record has no field for are kept in each part's catch-all
mapping and written back unchanged. A file of a newer ``schema_version`` is refused with a message that says so.

Writing: a field that is None is left out of the file, except the few the writers always wrote, as null: those
declared ``value(null=...)`` below (``early_stop_step`` of a run that trained and did not stop early, ``budget``
of a grid cell without one, ...). So a record read from a file written by this version writes the same JSON back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Self

from peftlab.durable import atomic_write_json

SCHEMA_VERSION = 1
RESULT_NAME = "result.json"  # a run folder's result; one that holds it is a finished run


class ResultError(ValueError):
    """A result file that cannot be read as a record; the message names the file and the key."""


# ----------------------------------------------------------------------------------------------- field kinds


def value(*, null: str | None = None) -> Any:
    """A plain JSON value, None when the file lacks it.

    Args:
        null: when a None value is still written, as null: ``"always"``, or the name of another field of the
            same part whose being set means this one is part of the record (``early_stop_step`` goes with
            ``steps``). Otherwise None leaves the key out.
    """
    return field(default=None, metadata={"null": null})


def nested(part: type[Part], shape: str = "one", *, null: str | None = None) -> Any:
    """A part (``shape="one"``), a ``{key: part}`` mapping (``"map"``) or a list of parts (``"list"``); None when
    the file lacks it. ``null`` as in :func:`value`."""
    return field(default=None, metadata={"part": part, "shape": shape, "null": null})


def spare() -> Any:
    """The keys of a part that it has no field for (a metric name, a method's own facts, a newer field), kept as
    read and written back at this field's place in the part's key order."""
    return field(default_factory=dict, metadata={"spare": True})


def number(value: Any) -> float | None:
    """A record field read as a number: ints and floats as float, anything else (None, text, bool) as None."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _json_type(data: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(type(data), type(data).__name__)


def _mapping(data: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ResultError(f"{where}: expected an object ({{...}}), got {_json_type(data)}")
    return data


class Part:
    """One JSON object of the record as a dataclass; ``from_dict`` / ``to_dict`` follow each field's kind
    (:func:`value`, :func:`nested`, :func:`spare`)."""

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Self:
        """The part of a JSON object (``where`` names it in errors: ``"run.json: train_info"``)."""
        data = _mapping(data, where)
        known = {f.name: f for f in fields(cls) if not f.metadata.get("spare")}  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {}
        others: dict[str, Any] = {}
        for key, item in data.items():
            if key in known:
                kwargs[key] = _decode(known[key], item, f"{where}.{key}")
            else:
                others[key] = item
        spares = [f.name for f in fields(cls) if f.metadata.get("spare")]  # type: ignore[arg-type]
        if spares:
            kwargs[spares[0]] = others
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in field order (see the module docstring for when None is written)."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            item = getattr(self, f.name)
            if f.metadata.get("spare"):
                out.update(item)
            elif item is not None:
                out[f.name] = _encode(f, item)
            elif f.metadata.get("null") == "always" or (f.metadata.get("null")
                                                        and getattr(self, f.metadata["null"]) is not None):
                out[f.name] = None
        return out

    @property
    def empty(self) -> bool:
        """Nothing of this part is recorded (it would be written as ``{}``)."""
        return not self.to_dict()


def _decode(f: Any, item: Any, where: str) -> Any:
    part, shape = f.metadata.get("part"), f.metadata.get("shape")
    if part is None or item is None:
        return item
    if shape == "one":
        return part.from_dict(item, where)
    if shape == "map":
        return {str(k): part.from_dict(v, f"{where}.{k}") for k, v in _mapping(item, where).items()}
    if not isinstance(item, list):
        raise ResultError(f"{where}: expected a list, got {_json_type(item)}")
    return [part.from_dict(v, f"{where}[{i}]") for i, v in enumerate(item)]


def _encode(f: Any, item: Any) -> Any:
    shape = f.metadata.get("shape") if f.metadata.get("part") else None
    if shape == "one":
        return item.to_dict()
    if shape == "map":
        return {k: v.to_dict() for k, v in item.items()}
    if shape == "list":
        return [v.to_dict() for v in item]
    return item


# ----------------------------------------------------------------------------------------------- the parts


@dataclass
class RunInfo(Part):
    """How the run was made: the exact command and config, the software and machine, seed, commit and times."""

    command: str | None = value()
    config: dict[str, Any] | None = value()  # RunConfig.to_dict(): sections model, task, data, method, train, ...
    versions: dict[str, str] | None = value()  # package -> version
    machine: dict[str, Any] | None = value()  # hostname, platform, cpu, cpu_count, torch_threads, device, gpu
    seed: int | None = value()
    git_commit: str | None = value(null="versions")  # None outside a git checkout; "+dirty" with local changes
    started: float | None = value()  # Unix time
    finished: float | None = value()
    cpu_seconds: float | None = value()  # this process's CPU time (all its threads) from started to finished
    # A resumed run: the wall seconds its earlier attempts took up to the checkpoint it resumed from (work done
    # after that checkpoint was lost and is not counted); started/finished/cpu_seconds are the last attempt's.
    earlier_seconds: float | None = value()
    # "own": the run had a process of its own (compare runs each run in a child process); "shared": a grid's process
    # that ran earlier runs too, whose leftovers count in this run's peak memory; None: not recorded (a lone
    # `peftlab train`/`eval` has its process to itself; a grid result from before 7066679 shared its process).
    process: str | None = value()
    derived_from: str | None = value()  # a baseline computed inside another run (lead-3: the zero-shot run's stem)
    other: dict[str, Any] = spare()

    def config_value(self, section: str, key: str) -> Any:
        """``config[section][key]`` (``config_value("method", "name")``), None where the config lacks it."""
        part = self.config.get(section) if isinstance(self.config, Mapping) else None
        return part.get(key) if isinstance(part, Mapping) else None

    def attempt_seconds(self) -> float | None:
        """``finished - started``: the last attempt's wall time, None where either is not a number."""
        started, finished = number(self.started), number(self.finished)
        return finished - started if started is not None and finished is not None else None

    def wall_seconds(self) -> float | None:
        """The run's wall time: its last attempt's, plus what earlier attempts of a resumed run took up to the
        checkpoint it resumed from; None where the last attempt's is unknown."""
        attempt = self.attempt_seconds()
        return None if attempt is None else attempt + (number(self.earlier_seconds) or 0.0)

    def cpu_share(self) -> float | None:
        """CPU seconds over wall seconds x torch threads, both of the last attempt: the share of its cores the run
        had (well under 1: it shared them); None where not recorded."""
        cpu, wall = number(self.cpu_seconds), self.attempt_seconds()
        threads = (self.machine or {}).get("torch_threads")
        if cpu is None or wall is None or wall <= 0 or not isinstance(threads, int) or threads < 1:
            return None
        return cpu / (wall * threads)


@dataclass
class MethodFacts(Part):
    """The method a run used: its name and what its ``describe()`` adds (``r``, ``targets``, ``D``, ...)."""

    name: str | None = value()
    facts: dict[str, Any] = spare()


@dataclass
class EvalSpeed(Part):
    """Generation speed on one evaluated split."""

    eval_seconds: float | None = value()
    eval_examples_per_s: float | None = value()
    other: dict[str, Any] = spare()


@dataclass
class ValPoint(Part):
    """One validation during training: the step, the loss and the task metrics measured there (if any)."""

    step: int | None = value()
    loss: float | None = value()
    metrics: dict[str, Any] = spare()


@dataclass
class Forgetting(Part):
    """Cross-entropy on out-of-task text (``eval.forgetting_*``) before and after training."""

    data: str | None = value()
    split: str | None = value()
    field: str | None = value()
    texts: int | None = value()
    tokens: int | None = value()
    before_ce: float | None = value(null="always")  # None where the base was not measured (an adapter's eval)
    after_ce: float | None = value()
    delta_ce: float | None = value(null="always")
    other: dict[str, Any] = spare()


@dataclass
class TrainInfo(Part):
    """What the run trained and what it cost. Train runs fill all of it; an eval run the method, parameter
    counts, eval speed, peak memory and forgetting; a baseline only the method and parameter counts."""

    method: MethodFacts | None = nested(MethodFacts)
    trainable_params: int | None = value()
    total_params: int | None = value()
    trainable_percent: float | None = value()
    lr: float | None = value()
    steps: int | None = value()
    epochs_completed: float | None = value()
    train_examples: int | None = value()
    world_size: int | None = value()
    skipped_nonfinite_steps: int | None = value()
    train_seconds: float | None = value()
    epoch_seconds: list[float] | None = value()  # wall time of each finished epoch
    trunk_cache: bool | None = value()  # train.cache_frozen_trunk was in effect: later epochs skipped the trunk
    trunk_cache_bytes: int | None = value()
    train_input_tokens: int | None = value()
    train_target_tokens: int | None = value()
    train_tokens_per_s: float | None = value()
    eval: dict[str, EvalSpeed] | None = nested(EvalSpeed, "map")  # split -> speed
    peak_memory_bytes: int | None = value()
    peak_memory_kind: str | None = value()  # "cuda_max_allocated" | "cpu_peak_rss"
    start_memory_bytes: int | None = value()  # held when the run (train or eval) started: what earlier runs left
    train_peak_memory_bytes: int | None = value()  # the peak up to the end of training (before evaluation)
    train_trunk_tokens: int | None = value()
    train_flops_estimate: int | None = value()
    adapter_bytes: int | None = value()
    loss_curve: list[list[float]] | None = value()  # [[step, train loss], ...]
    val_curve: list[ValPoint] | None = nested(ValPoint, "list")
    best_step: int | None = value(null="steps")  # the validation step whose weights were kept
    early_stop_step: int | None = value(null="steps")  # None: training was not stopped early
    forgetting: Forgetting | None = nested(Forgetting, null="eval")  # None: not measured (eval.forgetting_data)
    other: dict[str, Any] = spare()

    @property
    def method_name(self) -> str | None:
        return self.method.name if self.method is not None else None


@dataclass
class SplitMetrics(Part):
    """The task metrics of one split (``accuracy``, ``rougeL``, ``predicted/<label>`` counts, ...), how many
    examples they are over, and the baselines the task scored on the same examples (lead-3)."""

    scores: dict[str, Any] = spare()
    n_examples: int | None = value()
    baselines: dict[str, dict[str, Any]] | None = value()  # name -> {metric: value}


@dataclass
class Sample(Part):
    """One generated output beside its source and references."""

    id: str | None = value()
    source: str | None = value()  # the first 600 characters
    prediction: str | None = value()
    references: list[str] | None = value()
    other: dict[str, Any] = spare()


@dataclass
class SplitRecords(Part):
    """The per-example records of one split (see ``per_example`` in the module docstring)."""

    ids: list[str] | None = value()
    records: dict[str, Any] = spare()  # record name -> packed values (and ``labels``: the label names)
    baselines: dict[str, dict[str, Any]] | None = value()  # name -> {record name: packed values}, same ids

    def flat(self) -> dict[str, Any]:
        """``{"ids": ..., <record>: ...}``: the records as a significance cell takes them."""
        return {"ids": self.ids, **self.records}

    def baseline(self, name: str) -> SplitRecords | None:
        """The records of baseline ``name`` scored on these examples (None when there are none)."""
        if not self.baselines or not self.baselines.get(name) or self.ids is None:
            return None
        return SplitRecords(ids=self.ids, records=dict(self.baselines[name]))


@dataclass
class PilotCandidate(Part):
    """One learning-rate pilot: its factor of the untuned rate, the rate, its lowest validation loss."""

    factor: float | None = value()
    lr: float | None = value()
    val_loss: float | None = value(null="always")  # None: the pilot diverged
    other: dict[str, Any] = spare()


@dataclass
class LrPilot(Part):
    """What a grid's learning-rate pilots tried and which rate the runs of the group trained at
    (:mod:`peftlab.lab.lr_pilot`)."""

    candidates: list[PilotCandidate] | None = nested(PilotCandidate, "list")
    chosen_lr: float | None = value()
    chosen_factor: float | None = value()
    chosen_val_loss: float | None = value(null="always")
    default_lr: float | None = value(null="always")  # the untuned rate (None when factor 1 was not tried)
    default_val_loss: float | None = value(null="always")
    steps: int | None = value(null="always")
    n_train: int | None = value(null="always")
    validation_examples: int | None = value(null="always")
    other: dict[str, Any] = spare()


GRID_KEYS = ("method", "variant", "n_train", "seed")  # what a grid cell must name


@dataclass
class GridCell(Part):
    """The grid cell ``peftlab compare`` ran a result as (``<method>--<variant>--n<N>--seed<k>``)."""

    method: str | None = value()
    variant: str | None = value()
    n_train: int | str | None = value(null="always")  # the N asked for; "all"/None: every example
    seed: int | None = value()
    budget: str | int | None = value(null="always")  # the grid's budget: '0.1%' or a parameter count
    budget_params: int | None = value()  # budget mode: the budget in parameters, and how the method was sized
    planned_trainable_params: int | None = value()
    budget_knob: str | None = value(null="budget_params")
    budget_fits: bool | None = value()
    lr: float | None = value()  # a pilot: its rate, its factor of the untuned rate, the extensions allowed
    factor: float | None = value()
    extend: int | None = value()
    stem: str | None = value()
    extension: bool | None = value()  # a pilot past the edge of the factors tried
    lr_pilot: LrPilot | None = nested(LrPilot)  # a run whose rate the pilots chose
    n_train_requested: str | None = value()  # "all" when n_train holds the count that was used
    other: dict[str, Any] = spare()

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Self:
        missing = [k for k in GRID_KEYS if not isinstance(data, Mapping) or k not in data]
        if missing:
            raise ResultError(f"{where}: grid record lacks {missing}; it needs {', '.join(GRID_KEYS)}")
        return super().from_dict(data, where)


# ----------------------------------------------------------------------------------------------- the record


def _split_map(part: type[Part], data: Any, where: str) -> dict[str, Any]:
    return {str(split): part.from_dict(item, f"{where}.{split}") for split, item in _mapping(data, where).items()}


@dataclass
class ResultRecord:
    """One run's result (see the module docstring). ``run_info`` and ``train_info`` are always objects (empty
    when the file lacks them); ``samples``, ``per_example`` and ``grid`` are None when the file lacks them."""

    kind: str | None = None
    diverged: str | None = None  # a pilot whose loss went non-finite: the error
    run_info: RunInfo = field(default_factory=RunInfo)
    train_info: TrainInfo = field(default_factory=TrainInfo)
    metrics: dict[str, SplitMetrics] = field(default_factory=dict)
    samples: dict[str, list[Sample]] | None = None
    per_example: dict[str, SplitRecords] | None = None
    grid: GridCell | None = None
    other: dict[str, Any] = field(default_factory=dict)  # top-level keys of a newer writer, kept

    @classmethod
    def from_dict(cls, data: Any, where: str = "<result>") -> ResultRecord:
        """The record of a result file's JSON (any file written since schema version 1 began; see the module
        docstring).

        Raises:
            ResultError: not a result (no ``metrics`` mapping), a newer schema version, or a part of the wrong
                shape; the message names ``where`` and the key.
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("metrics"), Mapping):
            raise ResultError(f"{where}: not a peftlab result: missing key 'metrics' ({{split: {{metric: value}}}})")
        version = data.get("schema_version", 1)  # a diverged pilot's file lacked it before this module: 1
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ResultError(f"{where}: schema_version {version!r} is not a version number")
        if version > SCHEMA_VERSION:
            raise ResultError(f"{where}: schema_version {version} is newer than this peftlab reads "
                              f"({SCHEMA_VERSION}); upgrade peftlab to read it")
        # A later version converts older files here, before the parts are read.
        known = {"schema_version", "kind", "diverged", "run_info", "train_info", "metrics", "samples",
                 "per_example", "grid"}
        samples = data.get("samples")
        return cls(
            kind=data.get("kind"), diverged=data.get("diverged"),
            run_info=RunInfo.from_dict(data.get("run_info") or {}, f"{where}: run_info"),
            train_info=TrainInfo.from_dict(data.get("train_info") or {}, f"{where}: train_info"),
            metrics=_split_map(SplitMetrics, data["metrics"], f"{where}: metrics"),
            samples=None if samples is None else _samples(samples, f"{where}: samples"),
            per_example=None if data.get("per_example") is None else _split_map(
                SplitRecords, data["per_example"], f"{where}: per_example"),
            grid=None if data.get("grid") is None else GridCell.from_dict(data["grid"], str(where)),
            other={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """The JSON of the result file, stamped with this version's ``schema_version``."""
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        for key, item in (("kind", self.kind), ("diverged", self.diverged)):
            if item is not None:
                out[key] = item
        for key, part in (("run_info", self.run_info), ("train_info", self.train_info)):
            if not part.empty:
                out[key] = part.to_dict()
        out["metrics"] = {split: m.to_dict() for split, m in self.metrics.items()}
        if self.samples is not None:
            out["samples"] = {split: [s.to_dict() for s in items] for split, items in self.samples.items()}
        if self.per_example is not None:
            out["per_example"] = {split: r.to_dict() for split, r in self.per_example.items()}
        if self.grid is not None:
            out["grid"] = self.grid.to_dict()
        return {**out, **self.other}

    def split_metrics(self, split: str) -> SplitMetrics | None:
        """The metrics of ``split`` (None when the run did not evaluate it)."""
        return self.metrics.get(split)

    def scores_of(self, split: str) -> dict[str, Any]:
        """The task metrics of ``split`` (empty when the run did not evaluate it)."""
        found = self.metrics.get(split)
        return found.scores if found is not None else {}

    def metric(self, split: str, name: str) -> Any:
        """``metrics[split][name]`` as recorded (None when absent)."""
        return self.scores_of(split).get(name)

    def baselines_of(self, split: str) -> dict[str, dict[str, Any]]:
        """The baselines the task scored on ``split``'s examples, ``{name: {metric: value}}`` (empty when none)."""
        found = self.metrics.get(split)
        return found.baselines or {} if found is not None else {}

    def samples_of(self, split: str) -> list[Sample]:
        """The generated outputs kept for ``split`` (empty when none)."""
        return (self.samples or {}).get(split) or []

    def records_of(self, split: str) -> SplitRecords | None:
        """The per-example records of ``split`` (None in files from before they were recorded)."""
        return (self.per_example or {}).get(split)


def _samples(data: Any, where: str) -> dict[str, list[Sample]]:
    out = {}
    for split, items in _mapping(data, where).items():
        if not isinstance(items, list):
            raise ResultError(f"{where}.{split}: expected a list, got {_json_type(items)}")
        out[str(split)] = [Sample.from_dict(s, f"{where}.{split}[{i}]") for i, s in enumerate(items)]
    return out


# ----------------------------------------------------------------------------------------------- read / write


def read_result(path: str | Path) -> ResultRecord:
    """The record in the result file at ``path``.

    Raises:
        ResultError: the file cannot be read, is not JSON (the message gives line and column), or is not a
            result record (see :meth:`ResultRecord.from_dict`).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ResultError(f"{path}: unreadable ({exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResultError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    return ResultRecord.from_dict(data, str(path))


def write_result(path: str | Path, record: ResultRecord) -> None:
    """Write ``record`` to ``path`` (indented JSON; parent folders made), atomically and durably."""
    atomic_write_json(path, record.to_dict())
