"""The contract every task implements, and the task registry.

A task turns raw rows into :class:`Example` objects (a source text, a training target and the references it is
scored against), owns the prompt template, and scores predictions. How predictions are made is the task's choice
through the :class:`Predictor` it is handed: generation tasks call ``predictor.generate``; classification ranks the
label set with ``predictor.score_choices``. Metric functions are pure (lists of strings in, floats out).
"""

from __future__ import annotations

from collections.abc import Sequence
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
    """Task metrics plus the raw predictions they were computed from."""

    metrics: dict[str, float]
    predictions: list[str]
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)


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
        raise NotImplementedError

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
