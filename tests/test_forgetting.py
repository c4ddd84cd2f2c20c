"""Forgetting cross-entropy: the text sample, the 'before' value being the base model's for every method, the
per-token formula, and the record a run writes."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import MODEL_FACTORIES, method_family_cases

from peftlab.config import ConfigError, load_config
from peftlab.evaluation.forgetting import encode_texts, forgetting_texts, text_cross_entropy
from peftlab.methods.base import PeftMethod
from peftlab.tasks.base import DataError

TEXTS = [[5, 9, 11, 3, 7, 2], [4, 8, 15, 16], [23, 42, 6, 1, 9, 9, 9, 30]]


@torch.no_grad()
def _direct_ce(model, texts) -> float:
    """Mean per-token cross-entropy by the formula: each text alone, full logits, every token but the first."""
    nll, count = 0.0, 0
    for seq in texts:
        ids = torch.tensor([seq])
        logits = model(input_ids=ids).logits[0, :-1].float()
        nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += len(seq) - 1
    return nll / count


@pytest.mark.parametrize("family", sorted(MODEL_FACTORIES))
def test_cross_entropy_equals_the_formula_with_padding(family):
    torch.manual_seed(0)
    model = MODEL_FACTORIES[family]().eval()
    ce, tokens = text_cross_entropy(model, TEXTS, pad_id=0)
    assert tokens == sum(len(t) - 1 for t in TEXTS)
    assert ce == pytest.approx(_direct_ce(model, TEXTS), abs=1e-5)


@pytest.mark.parametrize(("name", "family"), method_family_cases())
def test_before_training_every_method_is_the_base_model(name, family):
    """The 'before' value (raw text, method applied at its initialisation) is the untouched base model's."""
    from peftlab.methods import get_method

    torch.manual_seed(1)
    base = MODEL_FACTORIES[family]()
    expected, _ = text_cross_entropy(base, TEXTS, pad_id=0)
    torch.manual_seed(1)
    spec = get_method(name)
    method = spec.apply(MODEL_FACTORIES[family](), spec.build_config({}))
    before, _ = text_cross_entropy(method.model, TEXTS, pad_id=0)
    assert before == pytest.approx(expected, abs=1e-5), f"{name} is not the identity at initialisation"


@pytest.mark.parametrize(("name", "family"), method_family_cases())
def test_after_scores_every_adapted_model_as_it_is_used(name, family):
    """After training, every method is scored through its own prepare_inputs (virtual tokens, prefix caches)."""
    from peftlab.methods import get_method

    torch.manual_seed(1)
    spec = get_method(name)
    method = spec.apply(MODEL_FACTORIES[family](), spec.build_config({}))
    with torch.no_grad():  # move the adapted model off its initial identity, so "after" must differ from "before"
        for param in method.trainable_parameters().values():
            param.add_(0.05 * torch.randn_like(param))
    raw, _ = text_cross_entropy(method.model, TEXTS, pad_id=0)
    adapted, tokens = text_cross_entropy(method.model, TEXTS, pad_id=0, prepare=method.prepare_inputs)
    assert tokens == sum(len(t) - 1 for t in TEXTS)  # virtual positions carry no loss
    assert math.isfinite(adapted)
    if type(method).prepare_inputs is PeftMethod.prepare_inputs:  # the adapted weights already are the model
        assert adapted == pytest.approx(raw, abs=1e-5)
    else:  # virtual tokens or prefixes change what the text is scored with
        assert adapted != pytest.approx(raw, abs=1e-6)


def _write_split(folder, rows) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "test.jsonl.gz", "wt") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def test_texts_are_a_fixed_sample_and_lists_are_joined(tmp_path):
    _write_split(tmp_path / "d", [{"text": f"review {i}", "refs": ["a", "b"]} for i in range(50)])
    first = forgetting_texts(str(tmp_path / "d"), "test", "text", 10)
    assert first == forgetting_texts(str(tmp_path / "d"), "test", "text", 10) and len(set(first)) == 10
    assert forgetting_texts(str(tmp_path / "d"), "test", "refs", 1) == ["a\nb"]


def test_bad_field_and_short_split_name_the_problem(tmp_path):
    _write_split(tmp_path / "d", [{"article": "x y z"}, {"article": "p q"}])
    with pytest.raises(DataError, match=r"test\.jsonl\.gz:1: eval\.forgetting_field 'text' .*fields: article"):
        forgetting_texts(str(tmp_path / "d"), "test", "text", 1)
    with pytest.raises(DataError, match="forgetting_examples=5, but the split has only 2"):
        forgetting_texts(str(tmp_path / "d"), "test", "article", 5)


def test_config_checks_the_path_and_sizes():
    with pytest.raises(DataError, match=r"eval\.forgetting_data '/no/such/place'"):
        load_config(None, ["eval.forgetting_data=/no/such/place"]).validate()
    with pytest.raises(ConfigError, match=r"eval\.forgetting_tokens"):
        load_config(None, ["eval.forgetting_data=demo", "eval.forgetting_tokens=1"]).validate()


def test_encode_cuts_and_drops_one_token_texts(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    ids = encode_texts(tokenizer, ["a long enough sentence for several tokens", "a"], 3)
    assert ids == [tokenizer("a long enough sentence for several tokens", add_special_tokens=False).input_ids[:3]]


def test_a_run_records_before_after_and_delta(tiny_llama_dir, tmp_path):
    from peftlab.lab.experiment import eval_run, train_run

    common = [f"model={tiny_llama_dir}", "task=table-to-text", "data=demo", "eval.forgetting_data=demo",
              "eval.forgetting_field=references", "eval.forgetting_examples=4", "eval.forgetting_tokens=16",
              "data.max_train=8", "data.max_validation=4", "data.max_test=2", "train.max_steps=2",
              "train.batch_size=4", "eval.max_new_tokens=4"]
    zero = eval_run(load_config(None, [*common, f"out={tmp_path / 'zs'}"])).train_info.forgetting
    assert zero.before_ce == zero.after_ce and zero.delta_ce == 0.0 and zero.texts == 4
    trained = train_run(load_config(None, [*common, "method=lora", "train.lr=0.05", f"out={tmp_path / 'lora'}"]))
    record = trained.train_info.forgetting
    assert record.before_ce == pytest.approx(zero.before_ce, abs=1e-5)  # the same base, the same texts
    assert record.delta_ce == pytest.approx(record.after_ce - record.before_ce)
    assert record.delta_ce != 0.0
    off = train_run(load_config(None, [*common[:4], *common[7:], "method=lora", f"out={tmp_path / 'off'}",
                                       "eval.forgetting_data=null"]))
    assert off.train_info.forgetting is None
    assert json.loads((tmp_path / "off" / "result.json").read_text())["train_info"]["forgetting"] is None
