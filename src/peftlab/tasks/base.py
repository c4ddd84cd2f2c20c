"""The contract every task implements, and the task registry.

A task turns raw rows into :class:`Example` objects (a source text, a training target and the references it is
scored against), owns the prompt template, and scores predictions. How predictions are made is the task's choice
through the :class:`Predictor` it is handed: generation tasks call ``predictor.generate``; classification ranks the
label set with ``predictor.score_choices``. Metric functions are pure (lists of strings in, floats out).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from peftlab.config import ConfigError, TaskConfig


@dataclass
class Example:
    """One task example.

    Attributes:
        id: stable identifier (from the data, or ``<split>-<index>``).
        source: the input text that fills the template's ``{source}`` slot.
        target: the text trained on (the first reference, or the label).
        references: every acceptable output, scored against at evaluation (one or more).
    """

    id: str
    source: str
    target: str
    references: list[str] = field(default_factory=list)


class Predictor(Protocol):
    """What a task may ask of the model at evaluation time (implemented in ``peftlab.evaluation``)."""

    def generate(self, examples: Sequence[Example], max_new_tokens: int) -> list[str]:
        """Decoded continuations of each example's prompt (the prompt itself excluded, special tokens removed)."""
        ...

    def score_choices(self, examples: Sequence[Example], choices: Sequence[str]) -> list[list[float]]:
        """Summed log-probability of each choice as the continuation of each example's prompt: (N, C)."""
        ...


@dataclass
class EvalOutput:
    """Task metrics plus the raw predictions they were computed from.

    ``per_example`` holds, for each example in order, what a paired significance test between two runs needs (the
    task's choice: label indices, per-example ROUGE F1, BLEU sufficient statistics); lists of one value (or one
    list of ints) per example, plus constants such as the label list. ``baseline_per_example`` holds the same for
    each baseline in ``baselines``.
    """

    metrics: dict[str, float]
    predictions: list[str]
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    per_example: dict[str, list] = field(default_factory=dict)
    baseline_per_example: dict[str, dict[str, list]] = field(default_factory=dict)


def percent_4(values: Sequence[float]) -> list[float]:
    """Per-example scores in [0, 1] as percentages rounded to 4 decimals (compact, and far finer than any test)."""
    return [round(100.0 * value, 4) for value in values]


def pack_records(records: dict[str, Any]) -> dict[str, Any]:
    """Per-example records as stored in a result file: every numeric list becomes one string.

    Result files are indented JSON, where a list puts each number on its own line; a 1,000-example split of BLEU
    statistics would take ~150 KB that way. A list of numbers is stored as ``"v1 v2 ..."``, a list of lists of
    numbers as ``"a1 a2 ...;b1 b2 ..."`` (one group per example); anything else (ids, label names) is kept.
    :func:`unpack_numbers` reads either form back.
    """

    def is_number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    packed: dict[str, Any] = {}
    for key, values in records.items():
        if isinstance(values, list) and values and all(is_number(v) for v in values):
            packed[key] = " ".join(_number_text(v) for v in values)
        elif isinstance(values, list) and values and all(
                isinstance(row, list) and all(is_number(v) for v in row) for row in values):
            packed[key] = ";".join(" ".join(_number_text(v) for v in row) for row in values)
        else:
            packed[key] = values
    return packed


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def unpack_numbers(value: str | list) -> list:
    """The numbers of a :func:`pack_records` column, flat (reshape a per-example matrix to ``(n_examples, -1)``);
    a plain JSON list is returned as it is.

    Raises:
        ValueError: a string that is not space/semicolon-separated numbers.
    """
    if not isinstance(value, str):
        return value
    return [float(v) for v in value.replace(";", " ").split()]


class Task:
    """Base class; subclasses set the class attributes and implement ``example_from_row`` and ``evaluate``."""

    name: str = ""
    default_source_field: str = ""
    default_target_field: str = ""
    default_template: str = "{source}"
    default_max_new_tokens: int = 64
    primary_metric: str = ""
    # True when fit_labels() must see the training split before evaluating (classification without task.labels).
    needs_train_labels: bool = False

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self.source_field = config.source_field or self.default_source_field
        self.target_field = config.target_field or self.default_target_field
        self.template = config.template or self.default_template

    def prompt_parts(self, source: str) -> tuple[str, str]:
        """The template text before and after ``{source}`` (the source alone may be truncated)."""
        before, after = self.template.split("{source}", 1)
        return before, after

    def format_prompt(self, source: str) -> str:
        before, after = self.prompt_parts(source)
        return before + source + after

    def example_from_row(self, row: dict[str, Any], index: int, where: str) -> Example | None:
        """Build an :class:`Example` from a raw row.

        Args:
            row: the parsed record.
            index: its 0-based position in the split (for a default id).
            where: ``"path:line"`` for error messages.

        Returns:
            The example, or None when its target is empty (the data layer counts or rejects those).

        Raises:
            DataError: a field is missing (the message names it and the fields present) or has the wrong type.
        """
        raise NotImplementedError

    def fit_labels(self, train: Sequence[Example]) -> None:
        """Called once with the training examples before training (classification fixes its label set here)."""

    def evaluate(self, predictor: Predictor, examples: Sequence[Example], max_new_tokens: int | None) -> EvalOutput:
        """Score the model on ``examples``.

        Args:
            predictor: the model wrapper (generation tasks call ``generate``, classification ``score_choices``).
            examples: the examples to score (at least one).
            max_new_tokens: generation cap; None uses ``default_max_new_tokens``.

        Returns:
            The task's metrics, the predictions and, per example, what a paired test needs (:class:`EvalOutput`).
        """
        raise NotImplementedError

    def generated_and_references(self, predictor: Predictor, examples: Sequence[Example], max_new_tokens: int | None,
                                 clean: Callable[[str], str]) -> tuple[list[str], list[list[str]]]:
        """What a generation task scores: each example's generated text cut by ``clean`` (up to ``max_new_tokens``,
        or the task's default cap when None), and each example's references (its target when it has none).

        Raises:
            ValueError: no examples.
        """
        if not examples:
            raise ValueError(f"{self.name}: no examples to evaluate")
        limit = max_new_tokens if max_new_tokens is not None else self.default_max_new_tokens
        predictions = [clean(text) for text in predictor.generate(examples, limit)]
        return predictions, [ex.references or [ex.target] for ex in examples]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "template": self.template, "source_field": self.source_field,
                "target_field": self.target_field}


class DataError(ValueError):
    """Bad input data; the message names the file, line, field or value and what was expected."""


_REGISTRY: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    _REGISTRY[cls.name] = cls
    return cls


def get_task(config: TaskConfig) -> Task:
    """Instantiate the task named in ``config``; an unknown name lists the registered tasks."""
    if config.name not in _REGISTRY:
        raise ConfigError(f"task: unknown task {config.name!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[config.name](config)


def task_names() -> list[str]:
    return sorted(_REGISTRY)
