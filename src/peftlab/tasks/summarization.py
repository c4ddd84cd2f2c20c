"""Abstractive summarization (CNN/DailyMail): article -> highlights, scored with ROUGE against the lead-3 baseline.

Also home of the row helpers every task shares (``require_field``, ``text_value``, ``example_id``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

from peftlab.evaluation.metrics import lead_n, mean_percent, rouge_f1_per_example
from peftlab.tasks.base import DataError, EvalOutput, Example, Predictor, Task, percent_4, register


def require_field(row: dict[str, Any], field: str, where: str, role: str) -> Any:
    """``row[field]``, or a :class:`DataError` naming the field, the fields present and the option to change it.

    Args:
        row: the parsed record.
        field: the field wanted.
        where: ``"path:line"`` of the record.
        role: ``"source"`` or ``"target"`` (names the ``task.<role>_field`` option in the message).
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with a {field!r} field, got {type(row).__name__}")
    if field not in row:
        present = ", ".join(repr(key) for key in row) or "none"
        raise DataError(f"{where}: missing {role} field {field!r}; fields present: {present} "
                        f"(set task.{role}_field=<name> to use another field)")
    return row[field]


def text_value(value: Any, field: str, where: str) -> str:
    """A string field's value; a list of strings (e.g. highlight sentences) is joined one per line."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return "\n".join(item.strip() for item in value if item.strip())
    raise DataError(f"{where}: field {field!r} must be a string or a list of strings, got {type(value).__name__}")


def example_id(row: dict[str, Any], index: int, where: str) -> str:
    """The row's ``id`` when it has one, else ``<split>-<index>``.

    The split is the file name in ``where`` without extensions (``data/validation.jsonl.gz:4`` -> ``validation``,
    ``data/train.parquet:row 5`` -> ``train``); ``row`` when none can be read.
    """
    if row.get("id") is not None and str(row["id"]).strip():
        return str(row["id"])
    path = where.rsplit(":", 1)[0] if ":" in where else where
    stem = re.match(r"[\w-]+", PurePath(path).name)
    return f"{stem.group(0) if stem else 'row'}-{index}"


def cut_at_blank_line(text: str) -> str:
    """A generated summary ends at the first blank line (highlights are consecutive lines; anything after a blank
    line is the model continuing past its answer, e.g. a new ``### ...`` section)."""
    return text.strip().split("\n\n", 1)[0].strip()


@register
class SummarizationTask(Task):
    """Summarize a news article; the target is its highlights, one sentence per line.

    Metrics: ROUGE-1/2/L/Lsum F1 (x100, ``rouge-score`` with stemming). ``EvalOutput.baselines["lead-3"]`` scores
    the first three article sentences on the same examples, the standard extractive baseline.
    """

    name = "summarization"
    default_source_field = "article"
    default_target_field = "summary"
    default_template = "Summarize the news article below in a few sentences.\n\nArticle:\n{source}\n\nSummary:\n"
    default_max_new_tokens = 128
    primary_metric = "rougeL"

    def example_from_row(self, row: dict[str, Any], index: int, where: str) -> Example | None:
        """Article -> summary; the summary may be a string or a list of highlight sentences (joined by newlines)."""
        source = require_field(row, self.source_field, where, "source")
        target = require_field(row, self.target_field, where, "target")
        source = text_value(source, self.source_field, where).strip()
        target = text_value(target, self.target_field, where).strip()
        if not target:
            return None
        return Example(id=example_id(row, index, where), source=source, target=target, references=[target])

    def evaluate(self, predictor: Predictor, examples: Sequence[Example], max_new_tokens: int | None) -> EvalOutput:
        """Generate summaries (cut at the first blank line), score them with ROUGE, and score lead-3 on the same
        examples (arguments as :meth:`Task.evaluate`).

        Returns:
            ROUGE metrics, the cleaned predictions, and ``baselines["lead-3"]`` with the same keys; per example,
            each ROUGE F1 (x100) of the predictions and of lead-3.
        """
        predictions, references = self.generated_and_references(predictor, examples, max_new_tokens,
                                                                cut_at_blank_line)
        scores = rouge_f1_per_example(predictions, references)
        lead3 = rouge_f1_per_example([lead_n(ex.source, 3) for ex in examples], references)
        return EvalOutput(metrics=_means(scores), predictions=predictions, baselines={"lead-3": _means(lead3)},
                          per_example=_records(scores), baseline_per_example={"lead-3": _records(lead3)})


def _means(scores: dict[str, list[float]]) -> dict[str, float]:
    return {key: mean_percent(values) for key, values in scores.items()}


def _records(scores: dict[str, list[float]]) -> dict[str, list]:
    """Per-example ROUGE F1 (x100, 4 decimals) for paired tests; the means above come from the same values."""
    return {key: percent_4(values) for key, values in scores.items()}
