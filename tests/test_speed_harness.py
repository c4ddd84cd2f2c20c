"""The speed benchmark (benchmarks/speed/) in its tiniest mode: a random tiny Llama with SmolLM2's tokenizer, a few
IMDB-style reviews, one method; the three variants (peftlab, PEFT + Trainer, course recipe) each in a process.

What must hold whatever the timings: every worker reports the fields, all three saw exactly the planned real and
target tokens, the course recipe computed every position of max_length-padded batches, peftlab's head ran on target
positions only, and the evaluation-generation comparison finds peftlab's outputs identical to PEFT's generate().
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import requires_smollm2

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed"
RUN_FIELDS = ("variant", "method", "workload", "tokens_per_s", "seconds", "step_seconds", "real_tokens",
              "target_tokens", "positions", "head_rows", "peak_memory_bytes", "train_peak_over_loaded_bytes",
              "loaded_rss_bytes", "memory_kind", "trainable_params", "useful_gflops_per_s", "executed_gflops_per_s",
              "mfu", "tokens_match_plan", "command")
pytestmark = pytest.mark.filterwarnings(
    "ignore:Position ids are not supported:UserWarning",
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
)


def write_split(folder: Path, split: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / f"{split}.jsonl.gz", "wt", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def harness_result(tmp_path_factory, smollm2_tokenizer_dir):
    root = tmp_path_factory.mktemp("speed")
    reviews = [{"id": f"r{i}", "text": " ".join(["a fine film<br /><br />with a plot"] * (2 + 5 * i)),
                "label": ("negative", "positive")[i % 2]} for i in range(6)]
    write_split(root / "data" / "imdb", "train", reviews)
    out = root / "speed.json"
    cmd = [sys.executable, str(SPEED / "harness.py"), "--random-init", "tiny", "--tokenizer",
           str(smollm2_tokenizer_dir), "--methods", "lora-qv", "--workloads", "imdb", "--examples", "4",
           "--batch-size", "2", "--warmup", "1", "--steps", "1", "--matmul-size", "64", "--matmul-seconds", "0.05",
           "--threads", "1", "--data-root", str(root / "data"), "--workdir", str(root / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((root / "work" / "data-imdb.json").read_text())
    return json.loads(out.read_text()), data, proc.stdout


@requires_smollm2  # the tokenizer comes from the SmolLM2 package
def test_every_variant_reports_the_fields(harness_result):
    result, _, stdout = harness_result
    runs = result["runs"]
    assert sorted(r["variant"] for r in runs) == ["course", "peftlab", "trainer"]
    for run in runs:
        assert "error" not in run, run.get("error")
        missing = [key for key in RUN_FIELDS if key not in run]
        assert not missing, (run["variant"], missing)
        assert run["tokens_per_s"] > 0 and run["seconds"] > 0 and run["peak_memory_bytes"] > 0
        assert run["trainable_params"] == runs[0]["trainable_params"] > 0  # the same LoRA on both sides
    assert result["ceiling"]["gflops"] > 0 and len(result["ceiling"]["measurements"]) == 2
    row = result["summary"][0]
    assert row["a_over_b"] > 0 and row["a_over_c"] > 0
    assert "| imdb | lora-qv |" in stdout and set(result["run_info"]) >= {"git_commit", "machine", "versions"}


@requires_smollm2  # the tokenizer comes from the SmolLM2 package
def test_all_variants_saw_the_planned_tokens(harness_result):
    result, data, _ = harness_result
    window = [data["examples"][i] for i in data["batches"][1]]  # warmup 1: step 2 trains on the second batch
    real = sum(len(e["input_ids"]) for e in window)
    targets = sum(sum(1 for y in e["labels"] if y != -100) for e in window)
    runs = {r["variant"]: r for r in result["runs"]}
    for run in runs.values():
        assert (run["real_tokens"], run["target_tokens"]) == (real, targets), run["variant"]
        assert run["tokens_match_plan"]
    assert result["summary"][0]["same_real_tokens"]
    longest = max(len(e["input_ids"]) for e in window)
    assert runs["peftlab"]["positions"] == runs["trainer"]["positions"] == 2 * longest  # dynamic padding
    assert runs["course"]["positions"] == 2 * data["max_length"] == 2 * (512 + 8)  # padded to max_length
    assert runs["peftlab"]["head_rows"] == targets  # target-only head
    assert runs["trainer"]["head_rows"] == runs["trainer"]["positions"]  # logits at every position


def _speed_module(name: str):
    """A module of benchmarks/speed (its scripts import each other as top-level modules)."""
    sys.path.insert(0, str(SPEED))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(SPEED))


@requires_smollm2  # the tokenizer comes from the SmolLM2 package
@pytest.mark.parametrize("method", ["lora-qv", "prompt-tuning"])
def test_generation_matches_peft_generate(tiny_llama_dir, tmp_path, method):
    articles = [{"id": f"a{i}", "article": " ".join(["the council met on monday to vote ."] * (3 + 4 * i)),
                 "summary": "the council voted ."} for i in range(3)]
    write_split(tmp_path / "cnn_dailymail", "test", articles)
    result = _speed_module("gen_compare").main(["--model", str(tiny_llama_dir), "--method", method, "--examples", "3",
                                       "--batch-size", "2", "--max-new-tokens", "6", "--data-root", str(tmp_path),
                                       "--threads", "1"])
    assert result["examples"] == 3 and result["generated_tokens"] > 0
    assert result["identical"], result["different"]
    assert result["peftlab_merged"] == (method == "lora-qv")


def test_training_flops_formula():
    flops = _speed_module("speed_common").training_flops
    facts = {"body_params": 10, "head_params": 5, "body_trainable_params": 2, "head_trainable": False,
             "grads_into_body": True, "n_layers": 2, "attn_width": 4}
    # body 3 x (2*10*2 + 2*2) + head 1 x 2*5*2 + attention 9 x 2*4*2 x 3 (forward + backward)
    assert flops(facts, body_positions=3, head_rows=1, attn_sq=9) == 132 + 20 + 432
    head_only = {**facts, "body_trainable_params": 0, "head_trainable": True, "grads_into_body": False}
    # no backward through the body: body 3 x 2*10, head 1 x 2*5*2 (forward + its weight gradient), attention x 1
    assert flops(head_only, body_positions=3, head_rows=1, attn_sq=9) == 60 + 20 + 144


def test_planned_work_reads_the_window_batches():
    planned_work = _speed_module("speed_report").planned_work
    data = {"batches": [[0, 1], [2, 3]],
            "examples": [{"input_ids": [1] * n, "labels": [-100] * (n - 2) + [5, 6]} for n in (3, 4, 5, 6)]}
    assert planned_work(data, warmup=1, steps=1) == {"real_tokens": 11, "target_tokens": 4, "attn_sq": 61,
                                                     "examples": 2}


def test_harness_rejects_bad_arguments_naming_the_choices():
    harness = _speed_module("harness")
    with pytest.raises(SystemExit, match="lora-qv"):
        harness.parse_args(["--methods", "lora-q"])
    with pytest.raises(SystemExit, match="batch size x"):
        harness.parse_args(["--examples", "3", "--batch-size", "4"])
