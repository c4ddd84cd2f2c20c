"""Table-to-text (E2E NLG): a restaurant's meaning representation -> a fluent description, scored with corpus BLEU
against every human reference and ROUGE-L.

The meaning representation goes into the prompt as written (``name[The Eagle], eatType[coffee shop], ...``): it is
already a readable attribute list, and keeping it verbatim keeps the prompt comparable with published E2E setups.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from peftlab.evaluation.metrics import bleu_statistics, corpus_bleu, mean_percent, rouge_l_per_example
from peftlab.tasks.base import DataError, EvalOutput, Example, Predictor, Task, percent_4, register
from peftlab.tasks.summarization import example_id, require_field


def reference_list(value: Any, field: str, where: str) -> list[str]:
    """The non-empty references of a target field holding a list of strings (E2E) or one string (hub E2E)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DataError(f"{where}: field {field!r} must be a string or a list of strings, got {value!r:.80}")
    return [item.strip() for item in value if item.strip()]


def first_line(text: str) -> str:
    """A generated description ends at its first line break (E2E references are single paragraphs; later lines
    are the model continuing past its answer)."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


@register
class TableToTextTask(Task):
    """Describe a restaurant from its E2E attribute list; train on the first reference, score against all."""

    name = "table-to-text"
    default_source_field = "meaning_representation"
    default_target_field = "references"
    default_template = (
        "Write a short description of the restaurant with these attributes.\n\nAttributes: {source}\n\nDescription:\n"
    )
    default_max_new_tokens = 64
    primary_metric = "bleu"

    def example_from_row(self, row: dict[str, Any], index: int, where: str) -> Example | None:
        """Meaning representation -> references; the target is the first reference."""
        source = require_field(row, self.source_field, where, "source")
        if not isinstance(source, str):
            raise DataError(f"{where}: field {self.source_field!r} must be a string, got {type(source).__name__}")
        references = reference_list(require_field(row, self.target_field, where, "target"), self.target_field, where)
        if not references:
            return None
        return Example(id=example_id(row, index, where), source=source.strip(), target=references[0],
                       references=references)

    def evaluate(self, predictor: Predictor, examples: Sequence[Example], max_new_tokens: int | None) -> EvalOutput:
        """Generate one description per example (its first line); corpus BLEU and mean best-reference ROUGE-L (both
        x100). Arguments as :meth:`Task.evaluate`.

        Returns:
            ``{"bleu", "rougeL"}`` and the predictions (first generated line of each); per example, BLEU's
            sufficient statistics (``bleu_stats``, see :func:`~peftlab.evaluation.metrics.bleu_statistics`) and
            ROUGE-L F1 (x100).
        """
        predictions, references = self.generated_and_references(predictor, examples, max_new_tokens, first_line)
        rouge = rouge_l_per_example(predictions, references)
        metrics = {"bleu": corpus_bleu(predictions, references), "rougeL": mean_percent(rouge)}
        per_example = {"bleu_stats": bleu_statistics(predictions, references), "rougeL": percent_4(rouge)}
        return EvalOutput(metrics=metrics, predictions=predictions, per_example=per_example)
