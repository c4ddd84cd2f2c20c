"""The built-in demo dataset: deterministic, well-formed E2E rows, disjoint names, loadable by table-to-text."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from peftlab.config import TaskConfig
from peftlab.data.demo import DEMO_SPLITS, demo_rows
from peftlab.evaluation.metrics import corpus_bleu
from peftlab.tasks import get_task

SPLITS = ("train", "validation", "test")
MR_ITEM = re.compile(r"([A-Za-z ]+)\[([^\]]+)\]")
E2E_ORDER = ["name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near"]


def parse_mr(mr: str) -> dict[str, str]:
    items = [item.strip() for item in mr.split(", ")]
    parsed = [MR_ITEM.fullmatch(item) for item in items]
    assert all(parsed), mr
    return {match.group(1): match.group(2) for match in parsed}


def digest(split: str) -> str:
    return hashlib.sha256(json.dumps(demo_rows(split), ensure_ascii=False).encode()).hexdigest()


def test_sizes_and_reference_counts():
    expected = {"train": (600, 1, 1), "validation": (100, 1, 3), "test": (100, 2, 4)}
    for split, (rows, low, high) in expected.items():
        data = demo_rows(split)
        assert len(data) == rows
        counts = [len(row["references"]) for row in data]
        assert min(counts) == low and max(counts) == high
    assert set(DEMO_SPLITS) == set(SPLITS)


def test_deterministic_across_calls_and_hash_seeds():
    first = demo_rows("validation")
    first[0]["references"].append("mutated")  # callers get fresh lists
    assert demo_rows("validation") == demo_rows("validation") != first
    code = "from peftlab.data.demo import demo_rows; import json, hashlib, sys; " \
           "sys.stdout.write(hashlib.sha256(json.dumps(demo_rows('test'), ensure_ascii=False).encode()).hexdigest())"
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert result.stdout == digest("test")


def test_rows_are_well_formed():
    for split in SPLITS:
        rows = demo_rows(split)
        assert [row["id"] for row in rows] == [f"demo-{split}-{i:04d}" for i in range(len(rows))]
        for row in rows:
            assert set(row) == {"id", "meaning_representation", "references"}
            attrs = parse_mr(row["meaning_representation"])
            assert list(attrs) == [key for key in E2E_ORDER if key in attrs]  # E2E attribute order
            assert {"name", "eatType"} <= set(attrs) and len(attrs) >= 4
            refs = row["references"]
            assert len(set(refs)) == len(refs)  # several references are different wordings
            for ref in refs:
                assert attrs["name"] in ref and ref.endswith(".") and "  " not in ref
                if "near" in attrs:
                    assert attrs["near"] in ref


def test_restaurant_names_are_disjoint_across_splits():
    names = {split: {parse_mr(row["meaning_representation"])["name"] for row in demo_rows(split)} for split in SPLITS}
    assert not names["train"] & names["validation"]
    assert not names["train"] & names["test"]
    assert not names["validation"] & names["test"]
    assert len(names["train"]) > 100  # many names, so copying the name from the prompt has to be learned


def test_several_wordings_are_used():
    openings = {ref.split()[0] for row in demo_rows("train") for ref in row["references"]}
    assert {"Located", "There", "For", "The"} <= openings


def test_copying_the_attributes_scores_low_bleu():
    rows = demo_rows("test")
    refs = [row["references"] for row in rows]
    assert corpus_bleu([row["meaning_representation"] for row in rows], refs) < 15
    assert corpus_bleu([r[0] for r in refs], refs) == pytest.approx(100.0)


def test_unknown_split_lists_the_splits():
    with pytest.raises(ValueError, match="unknown split 'dev'; splits: train, validation, test"):
        demo_rows("dev")


def test_loadable_by_the_table_to_text_task():
    task = get_task(TaskConfig(name="table-to-text"))
    for split in SPLITS:
        rows = demo_rows(split)
        examples = [task.example_from_row(row, i, f"demo/{split}:{i + 1}") for i, row in enumerate(rows)]
        assert all(ex is not None for ex in examples)
        assert [ex.id for ex in examples] == [row["id"] for row in rows]
        for ex, row in zip(examples, rows, strict=True):
            assert ex.target == ex.references[0] == row["references"][0]
