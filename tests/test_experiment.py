"""End to end on a tiny Llama with the real tokenizer: train -> adapter + result.json -> eval reproduces it."""

from __future__ import annotations

import gzip
import json
import platform

import pytest

from peftlab.cli import main
from peftlab.config import ConfigError, load_config
from peftlab.lab.experiment import eval_run, train_run
from peftlab.methods.io import AdapterMismatchError

FAST = ["data.max_train=24", "data.max_validation=4", "data.max_test=4", "eval.max_new_tokens=6",
        "train.max_steps=3", "train.batch_size=4", "train.eval_every=2", "train.eval_examples=2",
        "train.log_every=1", "eval.show_examples=2"]


def _cfg(model_dir, out, *extra):
    return load_config(None, [f"model={model_dir}", "task=table-to-text", "data=demo", f"out={out}", *FAST, *extra])


@pytest.mark.parametrize("method", ["lora", "prompt-tuning", "last-layer", "full", "prefix-tuning",
                                    "adapter-houlsby", "adapter-scaled-parallel", "ia3", "last-blocks",
                                    "intrinsic-dim"])
def test_train_writes_result_and_eval_reproduces_it(tiny_llama_dir, tmp_path, method):
    out = tmp_path / method
    result = train_run(_cfg(tiny_llama_dir, out, f"method={method}"))
    saved = json.loads((out / "result.json").read_text())  # the file as written, key for key
    info = saved["train_info"]
    for key in ("trainable_params", "total_params", "trainable_percent", "train_seconds", "epoch_seconds",
                "train_tokens_per_s", "peak_memory_bytes", "train_flops_estimate", "adapter_bytes", "loss_curve",
                "val_curve", "best_step", "early_stop_step", "eval"):
        assert key in info, key
    assert 0 < result.train_info.trainable_params <= result.train_info.total_params
    assert result.train_info.train_flops_estimate > 0 and result.train_info.adapter_bytes > 0
    if platform.system() == "Linux":  # memory at the start and up to the end of training (VmRSS, VmHWM)
        info_ = result.train_info
        assert info_.start_memory_bytes > 0 and info_.train_peak_memory_bytes > 0
        # the kernel syncs per-thread RSS counters lazily: VmHWM read twice can go back by some pages (seen: 100 KB)
        assert info_.train_peak_memory_bytes <= info_.peak_memory_bytes + 16 * 2**20
    assert set(saved["run_info"]) >= {"config", "versions", "machine", "seed", "git_commit"}
    assert {"bleu", "rougeL"} <= set(result.scores_of("test")) and result.metrics["test"].n_examples > 0
    assert (out / "adapter" / "adapter.safetensors").exists() and (out / "metrics.jsonl").exists()
    assert saved == json.loads(json.dumps(result.to_dict(), default=str)) and saved["schema_version"] == 1

    again = eval_run(load_config(None, [f"model={tiny_llama_dir}", "data=demo", f"adapter={out / 'adapter'}",
                                        f"out={tmp_path / 'eval'}", "data.max_test=4", "eval.max_new_tokens=6",
                                        "eval.show_examples=2"]))
    assert again.metrics["test"] == result.metrics["test"]
    assert platform.system() != "Linux" or again.train_info.start_memory_bytes > 0
    assert [s.prediction for s in again.samples_of("test")] == [s.prediction for s in result.samples_of("test")]


def test_adapter_on_a_different_base_names_the_mismatch(tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    out = tmp_path / "run"
    train_run(_cfg(tiny_llama_dir, out, "method=lora"))
    with pytest.raises(AdapterMismatchError, match="model_type"):
        eval_run(load_config(None, [f"model={tiny_gpt2_dir}", "data=demo", f"adapter={out / 'adapter'}",
                                    f"out={tmp_path / 'eval'}"]))


def test_existing_run_is_never_overwritten(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    train_run(_cfg(tiny_llama_dir, out, "method=lora"))
    before = (out / "result.json").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        train_run(_cfg(tiny_llama_dir, out, "method=lora"))
    assert (out / "result.json").read_text() == before


def test_zero_shot_eval_and_classification(tiny_llama_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"id": str(i), "text": f"review {i} was {'great' if i % 2 else 'bad'}",
             "label": "positive" if i % 2 else "negative"} for i in range(12)]
    for split in ("train", "validation", "test"):
        with gzip.open(data / f"{split}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    result = eval_run(load_config(None, [f"model={tiny_llama_dir}", "task=classification", f"data={data}",
                                         f"out={tmp_path / 'zs'}"]))
    assert result.train_info.trainable_params == 0
    test = result.metrics["test"]
    assert 0 <= test.scores["accuracy"] <= 100 and test.n_examples == 12
    assert all(s.prediction in ("positive", "negative") for s in result.samples_of("test"))


def test_cli_train_and_errors(tiny_llama_dir, tmp_path, capsys):
    args = [f"model={tiny_llama_dir}", "data=demo", f"out={tmp_path / 'cli'}", *FAST]
    assert main(["train", *args]) == 0
    assert "bleu" in capsys.readouterr().out
    assert main(["train", "train.lrr=1"]) == 2
    assert "valid keys" in capsys.readouterr().err
    assert main(["train", "method.r=0"]) == 2  # fails before any model is loaded
    assert "method.r" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", ["train", "eval", "demo", "methods", "compare", "export", "import", "merge", "analyze", "report"]
)
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert command in capsys.readouterr().out


def test_methods_lists_options(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("lora", "prompt-tuning", "last-layer", "full", "method.r", "method.n_tokens"):
        assert name in out
