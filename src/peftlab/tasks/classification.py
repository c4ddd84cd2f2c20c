"""Text classification (IMDB sentiment) by ranking the label set: the prediction is the label whose tokens the model
scores highest as the continuation of the prompt, so every prediction is a valid label (no free-form parsing).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from peftlab.config import TaskConfig
from peftlab.evaluation.metrics import accuracy, macro_f1
from peftlab.tasks.base import DataError, EvalOutput, Example, Predictor, Task, register
from peftlab.tasks.summarization import example_id, require_field

LABELS_SLOT = "{labels}"
_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def clean_review(text: str) -> str:
    """IMDB keeps the HTML line breaks of the original pages (``<br /><br />``): turn them into newlines."""
    return _HTML_BREAK.sub("\n", text).strip()


def label_text(value: Any, field: str, where: str) -> str:
    """A label as a string: strings are stripped, integers (e.g. the hub's 0/1) are written out; None is empty."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: label field {field!r} must be a string or an integer, got {value!r}")
    return str(value).strip()


@register
class ClassificationTask(Task):
    """Sentiment classification with an Alpaca-style prompt that lists the label set.

    The template's ``{labels}`` slot (if any) is filled with the labels joined by ", " as soon as they are known:
    at construction when ``task.labels`` is set, else in :meth:`fit_labels` from the training split. Metrics:
    accuracy and macro-F1 (x100), plus ``predicted/<label>``, the number of predictions of each label (a model that
    always answers the same label shows up here).
    """

    name = "classification"
    default_source_field = "text"
    default_target_field = "label"
    default_template = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nClassify the sentiment of this movie review. Answer with one of: {labels}.\n\n"
        "### Input:\n{source}\n\n### Response:\n"
    )
    default_max_new_tokens = 4
    primary_metric = "accuracy"

    def __init__(self, config: TaskConfig) -> None:
        super().__init__(config)
        self.template_with_labels = self.template
        self.labels: list[str] | None = None
        # Without task.labels the label set comes from the training split, even for evaluation alone.
        self.needs_train_labels = config.labels is None
        if config.labels is not None:
            self.set_labels([str(label).strip() for label in config.labels])

    def set_labels(self, labels: Sequence[str]) -> None:
        """Fix the label set (order kept) and fill the template's ``{labels}`` slot."""
        if len(set(labels)) < 2:
            raise DataError(f"{self.name}: needs at least two distinct labels, got {list(labels)!r}")
        self.labels = list(labels)
        self.template = self.template_with_labels.replace(LABELS_SLOT, ", ".join(self.labels))

    def fit_labels(self, train: Sequence[Example]) -> None:
        """Without ``task.labels``, the label set is the sorted distinct targets of the training examples."""
        if self.config.labels is None:
            self.set_labels(sorted({ex.target for ex in train}))

    def prompt_parts(self, source: str) -> tuple[str, str]:
        if LABELS_SLOT in self.template:
            raise DataError(f"{self.name}: the label set is not known yet, so the prompt's {LABELS_SLOT} slot cannot "
                            "be filled; set task.labels or call fit_labels(train examples) first")
        return super().prompt_parts(source)

    def example_from_row(self, row: dict[str, Any], index: int, where: str) -> Example | None:
        """Review text (HTML breaks -> newlines) -> label; a label outside ``task.labels`` fails here."""
        text = require_field(row, self.source_field, where, "source")
        label = label_text(require_field(row, self.target_field, where, "target"), self.target_field, where)
        if not isinstance(text, str):
            raise DataError(f"{where}: field {self.source_field!r} must be a string, got {type(text).__name__}")
        if not label:
            return None
        if self.config.labels is not None and label not in self.labels:
            raise DataError(f"{where}: label {label!r} is not in the label set {self.labels} (task.labels)")
        return Example(id=example_id(row, index, where), source=clean_review(text), target=label,
                       references=[label])

    def evaluate(self, predictor: Predictor, examples: Sequence[Example], max_new_tokens: int | None) -> EvalOutput:
        """Score every label for every example and predict the best one (ties: the first label in order).

        Args:
            predictor: the model wrapper (``score_choices`` is used; nothing is generated).
            examples: the examples to score (at least one); each target must be in the label set.
            max_new_tokens: unused (kept for the common signature).

        Returns:
            accuracy, macro_f1 and predicted/<label> counts; the predicted label strings; per example, the
            ``predicted`` and ``gold`` label indices into ``labels`` (stored with them).
        """
        if self.labels is None:
            raise DataError(f"{self.name}: the label set is not known; set task.labels or call fit_labels first")
        if not examples:
            raise ValueError(f"{self.name}: no examples to evaluate")
        for ex in examples:
            if ex.target not in self.labels:
                raise DataError(f"{self.name}: example {ex.id!r} has label {ex.target!r}, which is not in the "
                                f"label set {self.labels} (set task.labels to include it)")
        scores = predictor.score_choices(examples, self.labels)
        if len(scores) != len(examples) or any(len(row) != len(self.labels) for row in scores):
            raise ValueError(f"{self.name}: score_choices must return {len(examples)} rows of "
                             f"{len(self.labels)} scores")
        # argmax over labels; max() keeps the first of equal scores, so ties go to the earlier label.
        predicted = [max(range(len(row)), key=row.__getitem__) for row in scores]
        predictions = [self.labels[index] for index in predicted]
        golds = [ex.target for ex in examples]
        metrics = {"accuracy": accuracy(predictions, golds), "macro_f1": macro_f1(predictions, golds, self.labels)}
        for label in self.labels:
            metrics[f"predicted/{label}"] = float(predictions.count(label))
        per_example = {"predicted": predicted, "gold": [self.labels.index(gold) for gold in golds],
                       "labels": list(self.labels)}
        return EvalOutput(metrics=metrics, predictions=predictions, per_example=per_example)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "labels": self.labels}
