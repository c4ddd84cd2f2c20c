"""Config merging: defaults <- YAML <- dotted overrides, strict keys, range checks before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftlab.config import ConfigError, config_from_dict, load_config, parse_override

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_validate():
    cfg = load_config()
    assert cfg.model.name == "smollm2-135m"
    assert cfg.method.name == "lora"


def test_overrides_set_primary_fields_and_options():
    cfg = load_config(None, ["task=summarization", "data=../shared/data/cnn_dailymail", "method=lora",
                             "method.r=16", "train.max_steps=200", "train.lr=1e-4", "out=runs/x",
                             "method.target_modules=[q, k, v]"])
    assert cfg.task.name == "summarization"
    assert cfg.data.path == "../shared/data/cnn_dailymail"
    assert cfg.method.options == {"r": 16, "target_modules": ["q", "k", "v"]}
    assert cfg.train.max_steps == 200 and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.out == "runs/x"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: classification\nmethod:\n  name: prompt-tuning\n  n_tokens: 10\ntrain:\n  lr: 0.3\n")
    cfg = load_config(path, ["train.lr=0.1"])
    assert cfg.method.name == "prompt-tuning" and cfg.method.options == {"n_tokens": 10}
    assert cfg.train.lr == pytest.approx(0.1)


@pytest.mark.parametrize("override, fragment", [
    ("train.lrr=1", "train.lr"),          # the near miss is suggested and every valid key listed
    ("bogus=1", "valid keys"),
    ("train.lr=0", "train.lr: must be > 0"),
    ("train.lr=-1e-3", "train.lr: must be > 0"),
    ("eval.refill_rows=0", "eval.refill_rows: must be > 0"),
    ("method.r=0", "method.r"),
    ("method=prompt-tuning", None),
    ("train.batch_size=abc", "train.batch_size: expected an integer, got 'abc'"),
    ("train.lr=abc", "train.lr: expected a number (e.g. 2e-4) or null, got 'abc'"),
    ("train.schedule=exp", "'linear', 'cosine', 'constant'"),
    ("method=nope", "choose one of"),
    ("method.rr=4", "valid: "),
])
def test_bad_values_fail_with_the_key(override, fragment):
    if fragment is None:
        load_config(None, [override])  # valid
        return
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_eval_compile_needs_continuous_greedy_decoding():
    assert load_config(None, ["eval.compile=true"]).eval.continuous_batching  # the default
    for other in ("eval.continuous_batching=false", "eval.num_beams=2"):
        with pytest.raises(ConfigError, match="eval.compile: compiles the greedy decode step"):
            load_config(None, ["eval.compile=true", other])


def test_prompt_tuning_n_tokens_must_be_positive():
    with pytest.raises(ConfigError, match="n_tokens"):
        load_config(None, ["method=prompt-tuning", "method.n_tokens=0"])


def test_yaml_unknown_key_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*train.learning_rate.*valid keys"):
        load_config(path)


def test_parse_override_types():
    assert parse_override("a=1e-4") == ("a", pytest.approx(1e-4))
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=[q,v]") == ("a", ["q", "v"])
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_roundtrip_through_dict():
    cfg = load_config(None, ["method.r=4", "train.seed=3"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


def test_configs_are_shipped():
    assert len(CONFIGS) >= 6, "example configs for the three tasks x methods are missing"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.task.name in ("summarization", "classification", "table-to-text")


def test_values_get_the_field_type_once_for_sections_and_method_options(tmp_path):
    """YAML 1.1 reads 1e-4 (no dot) as a string; coercion by field type makes it the number it means, and a whole
    float for an int field (method.r=8.0) becomes the int, through the same path for method options."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  max_steps: 2e2\nmethod:\n  name: lora\n  r: 8.0\n  alpha: 16\n")
    cfg = load_config(path)
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.train.max_steps == 200 and isinstance(cfg.train.max_steps, int)
    from peftlab.methods import get_method

    lora = get_method("lora").build_config(cfg.method.options)
    assert lora.r == 8 and isinstance(lora.r, int) and isinstance(lora.alpha, float)
    with pytest.raises(ConfigError, match=r"^method\.alpha: expected a number \(e\.g\. 2e-4\), got 'x' \(str\)$"):
        get_method("lora").build_config({"alpha": "x"})
