"""The three tasks: rows -> examples (with clear errors), prompts, and evaluate() with a deterministic fake model."""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Sequence

import pytest
from conftest import SHARED_DATA, requires_shared_data

from peftlab.config import ConfigError, TaskConfig
from peftlab.evaluation.metrics import corpus_bleu, rouge_l, rouge_scores
from peftlab.tasks import DataError, Example, get_task, task_names
from peftlab.tasks.classification import ClassificationTask
from peftlab.tasks.summarization import SummarizationTask
from peftlab.tasks.table_to_text import TableToTextTask


class FakePredictor:
    """Returns fixed generations (by example id) and fixed choice scores; records what it was asked."""

    def __init__(self, outputs: dict[str, str] | None = None, scores: dict[str, list[float]] | None = None) -> None:
        self.outputs = outputs or {}
        self.scores = scores or {}
        self.calls: list[tuple] = []

    def generate(self, examples: Sequence[Example], max_new_tokens: int) -> list[str]:
        self.calls.append(("generate", max_new_tokens))
        return [self.outputs[ex.id] for ex in examples]

    def score_choices(self, examples: Sequence[Example], choices: Sequence[str]) -> list[list[float]]:
        self.calls.append(("score_choices", tuple(choices)))
        return [self.scores[ex.id] for ex in examples]


def task(name: str, **options) -> object:
    return get_task(TaskConfig(name=name, **options))


def test_registry_and_templates():
    assert task_names() == ["classification", "summarization", "table-to-text"]
    assert isinstance(task("summarization"), SummarizationTask)
    assert isinstance(task("table-to-text"), TableToTextTask)
    for cls in (SummarizationTask, ClassificationTask, TableToTextTask):
        assert "{source}" in cls.default_template and cls.default_template.endswith(":\n")
        assert cls.primary_metric
    with pytest.raises(ConfigError, match="choose one of classification, summarization, table-to-text"):
        task("translation")


# --- summarization -------------------------------------------------------------------------------------------------

def test_summarization_example_from_row():
    t = task("summarization")
    ex = t.example_from_row({"id": "x1", "article": " An article. ", "summary": "Line one.\nLine two."}, 0, "f:1")
    assert ex == Example(id="x1", source="An article.", target="Line one.\nLine two.",
                         references=["Line one.\nLine two."])
    listed = t.example_from_row({"article": "a", "summary": ["One.", " Two. ", ""]}, 7, "data/validation.jsonl.gz:8")
    assert listed.target == "One.\nTwo." and listed.id == "validation-7"
    assert t.example_from_row({"article": "a", "summary": "  "}, 0, "f:1") is None
    assert t.example_from_row({"id": None, "article": "a", "summary": "s"}, 2, "d/test.parquet:row 3").id == "test-2"
    assert t.example_from_row({"article": "a", "summary": "s"}, 2, "demo[test] row 3").id == "demo-2"
    assert "Article:\nhello\n\nSummary:\n" in t.format_prompt("hello")


def test_missing_field_names_field_fields_present_and_location():
    t = task("summarization")
    with pytest.raises(DataError) as err:
        t.example_from_row({"article": "a", "highlights": "h"}, 3, "data/train.jsonl:4")
    message = str(err.value)
    assert "data/train.jsonl:4" in message and "'summary'" in message
    assert "'article', 'highlights'" in message and "task.target_field" in message
    with pytest.raises(DataError, match="must be a string or a list of strings"):
        t.example_from_row({"article": 5, "summary": "s"}, 0, "f:1")


def test_configured_fields_are_used():
    t = task("summarization", target_field="highlights")
    assert t.example_from_row({"article": "a", "highlights": "h"}, 0, "f:1").target == "h"


def test_summarization_evaluate_scores_predictions_and_lead3():
    t = task("summarization")
    examples = [
        Example("a", "the cat sat . it was happy . then it slept . the end .", "the cat sat .\nit was happy .",
                ["the cat sat .\nit was happy ."]),
        Example("b", "Dogs bark. Birds sing. Fish swim. Cows moo.", "Birds sing loudly.", ["Birds sing loudly."]),
    ]
    # The blank line and what follows are cut from the generation before scoring.
    fake = FakePredictor({"a": "the cat sat .\nit was happy .\n\n### Article: junk", "b": "Fish swim."})
    out = t.evaluate(fake, examples, None)
    assert fake.calls == [("generate", 128)]
    assert out.predictions == ["the cat sat .\nit was happy .", "Fish swim."]
    assert out.metrics == pytest.approx({"rouge1": 50.0, "rouge2": 50.0, "rougeL": 50.0, "rougeLsum": 50.0})
    lead3 = ["the cat sat .\nit was happy .\nthen it slept .", "Dogs bark.\nBirds sing.\nFish swim."]
    expected_lead = rouge_scores(lead3, [ex.references for ex in examples])
    assert out.baselines["lead-3"] == pytest.approx(expected_lead)
    assert 0 < out.baselines["lead-3"]["rouge1"] < 100
    t.evaluate(fake, examples, 16)
    assert fake.calls[-1] == ("generate", 16)


def test_evaluate_rejects_no_examples():
    with pytest.raises(ValueError, match="no examples"):
        task("summarization").evaluate(FakePredictor(), [], None)


# --- classification ------------------------------------------------------------------------------------------------

def test_classification_rows_clean_html_and_stringify_labels():
    t = task("classification")
    ex = t.example_from_row({"id": "r", "text": "Great.<br /><br />Loved it<BR>", "label": "positive"}, 0, "f:1")
    assert ex.source == "Great.\n\nLoved it" and ex.target == "positive" and ex.references == ["positive"]
    assert t.example_from_row({"text": "x", "label": 1}, 0, "f:1").target == "1"
    assert t.example_from_row({"text": "x", "label": ""}, 0, "f:1") is None
    assert t.example_from_row({"text": "x", "label": None}, 0, "f:1") is None
    with pytest.raises(DataError, match="f:1: label field 'label' must be a string or an integer"):
        t.example_from_row({"text": "x", "label": [1]}, 0, "f:1")
    with pytest.raises(DataError, match="missing target field 'label'; fields present: 'text'"):
        t.example_from_row({"text": "x"}, 0, "f:1")


def test_configured_labels_fill_template_and_reject_unknown_labels_at_row_time():
    t = task("classification", labels=["positive", "negative"])
    assert not t.needs_train_labels and task("classification").needs_train_labels
    assert not task("summarization").needs_train_labels
    assert "Answer with one of: positive, negative.\n\n### Input:\nnice\n\n### Response:\n" in t.format_prompt("nice")
    with pytest.raises(DataError, match=r"imdb.jsonl:9: label 'neutral' is not in the label set \['positive', "):
        t.example_from_row({"text": "x", "label": "neutral"}, 8, "imdb.jsonl:9")
    t.fit_labels([Example("a", "x", "positive")])  # configured labels win over the training split
    assert t.labels == ["positive", "negative"]


def test_labels_fitted_from_training_split():
    t = task("classification")
    with pytest.raises(DataError, match="label set is not known"):
        t.format_prompt("x")
    train = [Example(str(i), "x", label) for i, label in enumerate(["pos", "neg", "pos", "neu"])]
    t.fit_labels(train)
    assert t.labels == ["neg", "neu", "pos"]
    assert "Answer with one of: neg, neu, pos." in t.format_prompt("x")
    assert t.describe()["labels"] == ["neg", "neu", "pos"]
    with pytest.raises(DataError, match="at least two distinct labels"):
        task("classification").fit_labels([Example("a", "x", "pos")])


def test_custom_template_without_labels_slot():
    t = task("classification", template="Review: {source}\nSentiment:\n")
    assert t.format_prompt("ok") == "Review: ok\nSentiment:\n"


def test_classification_predicts_the_argmax_label():
    t = task("classification")
    golds = {"a": "negative", "b": "positive", "c": "positive", "d": "negative"}
    examples = [Example(i, "text", label, [label]) for i, label in golds.items()]
    t.fit_labels(examples)
    # Label order is (negative, positive); "d" is a tie, which goes to the first label.
    scores = {"a": [-1.0, -3.0], "b": [-5.0, -0.5], "c": [-0.2, -0.9], "d": [-2.0, -2.0]}
    fake = FakePredictor(scores=scores)
    out = t.evaluate(fake, examples, None)
    assert fake.calls == [("score_choices", ("negative", "positive"))]
    assert out.predictions == ["negative", "positive", "negative", "negative"]
    # negative: tp 2, fp 1, fn 0 -> 0.8; positive: tp 1, fp 0, fn 1 -> 2/3.
    assert out.metrics == pytest.approx({"accuracy": 75.0, "macro_f1": 100 * (0.8 + 2 / 3) / 2,
                                         "predicted/negative": 3.0, "predicted/positive": 1.0})


def test_classification_evaluate_rejects_labels_outside_the_set():
    t = task("classification")
    t.fit_labels([Example("a", "x", "negative"), Example("b", "x", "positive")])
    with pytest.raises(DataError, match=r"example 'c' has label 'neutral'.*\['negative', 'positive'\]"):
        t.evaluate(FakePredictor(scores={"c": [0.0, 0.0]}), [Example("c", "x", "neutral")], None)
    with pytest.raises(ValueError, match="must return 1 rows of 2 scores"):
        t.evaluate(FakePredictor(scores={"a": [0.0]}), [Example("a", "x", "negative")], None)
    with pytest.raises(DataError, match="label set is not known"):
        task("classification").evaluate(FakePredictor(), [Example("a", "x", "negative")], None)


# --- table-to-text -------------------------------------------------------------------------------------------------

def test_table_to_text_rows():
    t = task("table-to-text")
    mr = "name[The Eagle], eatType[coffee shop]"
    ex = t.example_from_row({"id": "e", "meaning_representation": mr, "references": ["A. ", "", "B."]}, 0, "f:1")
    assert ex == Example("e", mr, "A.", ["A.", "B."])
    assert f"Attributes: {mr}\n\nDescription:\n" in t.format_prompt(mr)
    assert t.example_from_row({"meaning_representation": mr, "references": []}, 0, "f:1") is None
    hub = task("table-to-text", target_field="human_reference")
    assert hub.example_from_row({"meaning_representation": mr, "human_reference": "The Eagle."}, 0, "f:1").references \
        == ["The Eagle."]
    with pytest.raises(DataError, match="f:2: missing source field 'meaning_representation'; fields present: 'mr'"):
        t.example_from_row({"mr": mr, "references": ["x"]}, 1, "f:2")
    with pytest.raises(DataError, match="'references' must be a string or a list of strings"):
        t.example_from_row({"meaning_representation": mr, "references": {"a": 1}}, 0, "f:1")


def test_table_to_text_evaluate():
    t = task("table-to-text")
    examples = [Example("a", "mr", "the cat sat on the mat", ["the cat sat on the mat"]),
                Example("b", "mr", "a dog ran in a park", ["a dog ran in a park", "the dog ran fast"])]
    fake = FakePredictor({"a": "the cat sat on the mat\n### junk", "b": "\nthe dog ran\nmore"})
    out = t.evaluate(fake, examples, None)
    assert fake.calls == [("generate", 64)]
    assert out.predictions == ["the cat sat on the mat", "the dog ran"]
    refs = [ex.references for ex in examples]
    assert out.metrics["bleu"] == pytest.approx(corpus_bleu(out.predictions, refs))
    assert out.metrics["rougeL"] == pytest.approx((100 + 100 * 6 / 7) / 2)  # "the dog ran" vs "the dog ran fast"
    assert out.metrics["rougeL"] == pytest.approx(rouge_l(out.predictions, refs))
    perfect = t.evaluate(FakePredictor({"a": "the cat sat on the mat", "b": "the dog ran fast"}), examples, 8)
    assert perfect.metrics == pytest.approx({"bleu": 100.0, "rougeL": 100.0})


# --- real data -----------------------------------------------------------------------------------------------------

def _first_rows(path, n: int = 5) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in itertools.islice(handle, n)]


@requires_shared_data
@pytest.mark.parametrize("name, folder", [("summarization", "cnn_dailymail"), ("summarization",
                                          "cnn_dailymail_v3_raw_sample"), ("classification", "imdb"),
                                          ("table-to-text", "e2e_nlg")])
def test_real_validation_rows_map_to_examples(name, folder):
    path = SHARED_DATA / folder / "validation.jsonl.gz"
    t = task(name)
    examples = [t.example_from_row(row, i, f"{path}:{i + 1}") for i, row in enumerate(_first_rows(path))]
    assert all(ex is not None and ex.source and ex.target and ex.references for ex in examples)
    if name == "classification":
        assert all("<br" not in ex.source and ex.target in ("negative", "positive") for ex in examples)
    if name == "table-to-text":
        assert all(ex.source.startswith("name[") for ex in examples)
        assert max(len(ex.references) for ex in examples) > 1
    if name == "summarization":
        assert all("\n" in ex.target for ex in examples)  # highlights, one a line


# --- per-example records (paired significance) ---------------------------------------------------------------------

def test_classification_records_label_indices():
    t = task("classification", labels=["positive", "negative"])  # configured order, not sorted
    examples = [Example(i, "text", label, [label]) for i, label in {"a": "negative", "b": "positive"}.items()]
    out = t.evaluate(FakePredictor(scores={"a": [-1.0, -3.0], "b": [-2.0, -0.5]}), examples, None)
    assert out.predictions == ["positive", "negative"]
    assert out.per_example == {"predicted": [0, 1], "gold": [1, 0], "labels": ["positive", "negative"]}


def test_summarization_records_per_example_rouge_whose_mean_is_the_metric():
    t = task("summarization")
    examples = [Example("a", "the cat sat . it was happy . then it slept . the end .", "the cat sat .",
                        ["the cat sat .\nit was happy ."]),
                Example("b", "Dogs bark. Birds sing. Fish swim. Cows moo.", "Birds sing.", ["Birds sing loudly."])]
    out = t.evaluate(FakePredictor({"a": "the cat sat .", "b": "Fish swim and birds sing."}), examples, None)
    assert sorted(out.per_example) == ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    for key, values in out.per_example.items():
        assert len(values) == 2 and all(v == round(v, 4) for v in values)
        assert sum(values) / 2 == pytest.approx(out.metrics[key], abs=1e-4)  # rounded to 4 decimals
    lead = out.baseline_per_example["lead-3"]
    assert sum(lead["rouge1"]) / 2 == pytest.approx(out.baselines["lead-3"]["rouge1"], abs=1e-4)
    assert out.metrics == rouge_scores(out.predictions, [ex.references for ex in examples])


def test_table_to_text_records_bleu_statistics_and_rouge_l():
    from peftlab.evaluation.metrics import bleu_from_statistics

    t = task("table-to-text")
    examples = [Example("a", "mr", "the cat sat on the mat", ["the cat sat on the mat"]),
                Example("b", "mr", "a dog ran in a park", ["a dog ran in a park", "the dog ran fast"])]
    out = t.evaluate(FakePredictor({"a": "the cat sat on a mat", "b": "the dog ran"}), examples, None)
    stats = out.per_example["bleu_stats"]
    assert len(stats) == 2 and all(len(row) == 10 for row in stats)
    assert bleu_from_statistics([sum(col) for col in zip(*stats, strict=True)]) == out.metrics["bleu"]
    assert sum(out.per_example["rougeL"]) / 2 == pytest.approx(out.metrics["rougeL"], abs=1e-4)


def test_packed_records_are_compact_and_read_back():
    import json
    import random

    from peftlab.tasks.base import pack_records, unpack_numbers

    rng = random.Random(0)
    records = {"bleu_stats": [[rng.randrange(40) for _ in range(10)] for _ in range(1000)],
               "rougeL": [round(rng.uniform(0, 100), 4) for _ in range(1000)], "labels": ["neg", "pos"],
               "predicted": [rng.randrange(2) for _ in range(1000)]}
    packed = pack_records(records)
    assert packed["labels"] == ["neg", "pos"]
    assert unpack_numbers(packed["rougeL"]) == records["rougeL"]
    assert unpack_numbers(packed["predicted"]) == records["predicted"]
    assert unpack_numbers(packed["bleu_stats"]) == [v for row in records["bleu_stats"] for v in row]
    # 1,000 table-to-text examples (the largest records) as a result file stores them: indented JSON.
    stored = {"ids": [f"test-{i}" for i in range(1000)], "bleu_stats": packed["bleu_stats"],
              "rougeL": packed["rougeL"]}
    assert len(json.dumps({"per_example": {"test": stored}}, indent=2)) < 60_000
    assert unpack_numbers([1, 2]) == [1, 2]
