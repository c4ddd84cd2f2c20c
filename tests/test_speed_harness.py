"""The speed benchmark (benchmarks/speed/) in its tiniest mode: a random tiny Llama with SmolLM2's tokenizer, a few
IMDB-style reviews, one method; the four variants (peftlab, PEFT + Trainer, the expert Trainer set-up, course recipe)
each in a process.

What must hold whatever the timings: every worker reports the fields, all four saw exactly the planned real and
target tokens, the course recipe computed every position of max_length-padded batches, peftlab's and the expert
Trainer's heads ran on target positions only (with the same loss as the plain Trainer's), the runs follow the
rotated order, the statistics are what their definitions say on known inputs, and the evaluation-generation
comparison tokenizes once and finds peftlab's outputs (batch after batch and continuous batching) identical to PEFT's
generate(), merged and unmerged, token for token.
"""

from __future__ import annotations

import gzip
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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
           "--threads", "1", "--repeats", "1", "--data-root", str(root / "data"), "--workdir", str(root / "work"),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((root / "work" / "data-imdb.json").read_text())
    return json.loads(out.read_text()), data, proc.stdout


@requires_smollm2  # the tokenizer comes from the SmolLM2 package
def test_every_variant_reports_the_fields(harness_result):
    result, _, stdout = harness_result
    runs = result["runs"]
    assert sorted(r["variant"] for r in runs) == ["course", "peftlab", "trainer", "trainer-expert"]
    for run in runs:
        assert "error" not in run, run.get("error")
        missing = [key for key in RUN_FIELDS if key not in run]
        assert not missing, (run["variant"], missing)
        assert run["tokens_per_s"] > 0 and run["seconds"] > 0 and run["peak_memory_bytes"] > 0
        assert run["trainable_params"] == runs[0]["trainable_params"] > 0  # the same LoRA on both sides
    assert result["ceiling"]["gflops"] > 0 and len(result["ceiling"]["measurements"]) == 2
    row = result["summary"][0]
    assert row["a_over_b"] > 0 and row["a_over_c"] > 0 and row["a_over_b_expert"] > 0
    assert len(row["ratios"]["a/b'"]["pairs"]) == 1 and row["variants"]["peftlab"]["step_seconds"]["median"] > 0
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
    assert runs["peftlab"]["head_rows"] == runs["trainer-expert"]["head_rows"] == targets  # target-only head
    assert runs["trainer-expert"]["positions"] == runs["trainer"]["positions"]
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
def test_generation_matches_peft_generate(tiny_llama_dir, tmp_path, monkeypatch, method):
    from peftlab.data.encode import PromptEncoder

    articles = [{"id": f"a{i}", "article": " ".join(["the council met on monday to vote ."] * (3 + 4 * i)),
                 "summary": "the council voted ."} for i in range(3)]
    write_split(tmp_path / "cnn_dailymail", "test", articles)
    calls = []
    encode = PromptEncoder.encode_prompts
    monkeypatch.setattr(PromptEncoder, "encode_prompts", lambda self, ex: calls.append(len(ex)) or encode(self, ex))
    result = _speed_module("gen_compare").main([
        "--model", str(tiny_llama_dir), "--method", method, "--examples", "3", "--batch-size", "2",
        "--max-new-tokens", "6", "--data-root", str(tmp_path), "--threads", "1", "--repeats", "2", "--unmerged",
        "--variants", "batched,continuous,peft", "--profile", "2"])
    assert result["examples"] == 3 and result["generated_tokens"] > 0
    assert result["identical"], result["different"]
    assert calls == [3]  # tokenized once, before timing: warm-up, rounds and phases reuse the ids
    phases = ["unmerged", "merged"] if method == "lora-qv" else ["unmerged"]
    assert list(result["phases"]) == phases and result["peftlab_merged"] == (method == "lora-qv")
    for phase in result["phases"].values():
        # rotated: each side leads once
        assert phase["order"] == ["batched", "continuous", "peft", "continuous", "peft", "batched"]
        assert sorted(phase["ratios"]) == ["batched/peft", "continuous/batched", "continuous/peft"]
        assert len(phase["seconds"]["batched"]) == len(phase["ratios"]["continuous/peft"]) == 2
        assert phase["repeatable"] and phase["graphs_compiled_in_timed_rounds"]["continuous"] == 0
        assert phase["n_different"] == {"continuous vs batched": 0, "peft vs batched": 0, "batched vs peft": 0,
                                        "continuous vs peft": 0}
    profile = result["profile"]["continuous"]
    assert abs(sum(profile["groups"].values()) - 1) < 1e-6 and profile["ops"] and profile["ms_per_step"] > 0


def test_gen_compare_times_warmup_apart_and_rotates():
    timed_rounds = _speed_module("gen_compare").timed_rounds
    seen = []
    sides = {"continuous": lambda p: seen.append(("continuous", len(p))) or [[1]] * len(p),
             "peft": lambda p: seen.append(("peft", len(p))) or [[1]] * len(p)}
    result = timed_rounds(sides, prompts=[[1], [2], [3]], warmup=[[1]], repeats=3)
    assert seen[:2] == [("continuous", 1), ("peft", 1)]  # untimed warm-up, one batch each
    assert seen[2:] == [("continuous", 3), ("peft", 3), ("peft", 3), ("continuous", 3), ("continuous", 3),
                        ("peft", 3)]
    assert list(result["ratios"]) == ["continuous/peft"] and len(result["ratios"]["continuous/peft"]) == 3
    assert result["repeatable"]


def test_run_order_rotates_the_start_each_repeat():
    run_order = _speed_module("speed_common").run_order
    assert run_order(["a", "b", "c"], 4) == [(0, "a"), (0, "b"), (0, "c"), (1, "b"), (1, "c"), (1, "a"),
                                             (2, "c"), (2, "a"), (2, "b"), (3, "a"), (3, "b"), (3, "c")]


def test_run_all_runs_each_variant_in_a_fresh_process_in_rotated_order(tmp_path, monkeypatch):
    harness = _speed_module("harness")
    args = harness.parse_args(["--workloads", "imdb", "--methods", "lora-qv", "--variants",
                               "peftlab,trainer,trainer-expert", "--examples", "8", "--batch-size", "1"])
    assert args.repeats == 3  # the default
    commands = []
    monkeypatch.setattr(harness, "run_process",
                        lambda cmd, timeout: commands.append(cmd) or ({"tokens_per_s": 1.0}, ""))
    records = harness.run_all(args, "m", {"imdb": (tmp_path / "d.json", {})}, tmp_path)
    # A fresh interpreter per run, named by its worker script (and the Trainer recipe).
    variants = [c[3] if c[2] == "--recipe" else "peftlab" for c in commands]
    assert all(c[0] == sys.executable for c in commands)
    assert list(zip([r["repeat"] for r in records], variants, strict=True)) == harness.run_order(args.variants, 3)
    assert variants == ["peftlab", "trainer", "trainer-expert", "trainer", "trainer-expert", "peftlab",
                        "trainer-expert", "peftlab", "trainer"]


def _records(speeds: dict[str, list[float]]) -> list[dict]:
    """Worker records with given tok/s per variant by repeat (repeat 1 of 'course' failed)."""
    out = []
    for variant, values in speeds.items():
        for repeat, value in enumerate(values):
            record = {"workload": "w", "method": "m", "variant": variant, "repeat": repeat}
            if value is None:
                out.append({**record, "error": "boom"})
                continue
            out.append({**record, "tokens_per_s": value, "peak_memory_bytes": value * 1e7, "real_tokens": 10,
                        "step_seconds": [1 / value, 2 / value], "tokens_match_plan": True})
    return out


def test_statistics_on_known_inputs():
    report = _speed_module("speed_report")
    assert report.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0} and report.spread([]) is None
    records = _records({"peftlab": [215.0, 200.0, 177.0], "trainer": [150.0, 154.0, 142.0],
                        "trainer-expert": [200.0, 160.0, 177.0], "course": [100.0, None, 118.0]})
    assert report.pair_ratios(records, "peftlab", "trainer") == pytest.approx([215 / 150, 200 / 154, 177 / 142])
    assert report.pair_ratios(records, "peftlab", "course") == pytest.approx([2.15, 1.5])  # failed repeat skipped
    row = report.summarize(records)[0]
    ab = row["ratios"]["a/b"]
    assert ab["median_of_pairs"] == pytest.approx(200 / 154) and ab["of_medians"] == pytest.approx(200 / 150)
    assert row["a_over_b"] == pytest.approx(200 / 150) and row["a_over_b_expert"] == pytest.approx(200 / 177)
    assert row["ratios"]["b'/b"]["pairs"] == pytest.approx([200 / 150, 160 / 154, 177 / 142])
    a = row["variants"]["peftlab"]
    assert a["tokens_per_s_range"] == {"median": 200.0, "min": 177.0, "max": 215.0}
    steps = [1 / 215, 2 / 215, 1 / 200, 2 / 200, 1 / 177, 2 / 177]
    assert a["step_seconds"] == pytest.approx({"median": statistics.median(steps), "min": 1 / 215, "max": 2 / 177})
    assert row["memory_ratios"]["a/b"] == pytest.approx(200 / 150)
    assert row["variants"]["course"]["runs"] == 2 and row["variants"]["course"]["errors"] == ["boom"]
    table = report.markdown([row], None)
    assert "200.0 (177.0-215.0)" in table and "1.30x [1.43, 1.30, 1.25]" in table and "(b') trainer-expert" in table


@pytest.mark.parametrize("method", ["lora-qv", "prompt-tuning"])
def test_expert_trainer_loss_equals_the_full_logits_loss_on_labelled_rows_only(method):
    from transformers import LlamaConfig, LlamaForCausalLM

    common, worker = _speed_module("speed_common"), _speed_module("hf_trainer_worker")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, use_cache=False)
    model = common.apply_reference(LlamaForCausalLM(config), method)
    rows = [{"input_ids": list(range(3, 3 + n)), "labels": [-100] * (n - k) + list(range(40, 40 + k))}
            for n, k in ((9, 3), (6, 2))]
    batch = _pad_right(rows)
    expert = worker.LabelledHeadCollator(_pad_right, worker.virtual_token_count(model))(rows)
    head_rows = []
    model.get_base_model().lm_head.register_forward_hook(lambda m, a, o: head_rows.append(a[0].shape[:-1].numel()))
    n_items = (batch["labels"][:, 1:] != -100).sum()
    full = model(**batch, num_items_in_batch=n_items).loss
    labelled = model(**expert, num_items_in_batch=n_items).loss
    assert labelled.item() == pytest.approx(full.item(), abs=1e-5)
    virtual = 20 if method == "prompt-tuning" else 0
    assert head_rows == [2 * (9 + virtual), 3 + 2]  # every padded position, then only the labelled ones


def _pad_right(rows: list[dict]) -> dict[str, torch.Tensor]:
    """What DataCollatorForSeq2Seq gives (b): ids padded on the right, the mask, labels -100 on the padding."""
    width = max(len(r["input_ids"]) for r in rows)

    def pad(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (width - len(values))

    return {"input_ids": torch.tensor([pad(r["input_ids"], 0) for r in rows]),
            "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows]),
            "labels": torch.tensor([pad(r["labels"], -100) for r in rows])}


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


def test_the_compiled_variant_runs_peftlabs_worker_with_compile_and_is_compared_with_a():
    harness, report = _speed_module("harness"), _speed_module("speed_report")
    args = harness.parse_args(["--workloads", "imdb", "--methods", "lora-qv", "--examples", "8", "--batch-size", "1"])
    assert "peftlab-compile" not in args.variants  # minutes of compiling: only when asked for
    cmd = harness.worker_command(args, "peftlab-compile", "m", Path("d.json"), "lora-qv", Path("w"))
    assert Path(cmd[1]).name == "peftlab_worker.py" and cmd[2] == "--compile"
    records = _records({"peftlab": [200.0, 210.0], "peftlab-compile": [240.0, 231.0], "trainer": [150.0, 140.0]})
    row = report.summarize(records)[0]
    assert row["ratios"]["a'/a"]["pairs"] == pytest.approx([1.2, 1.1])
    assert row["ratios"]["a'/b"]["pairs"] == pytest.approx([1.6, 1.65])
    assert "(a') peftlab-compile tok/s" in report.markdown([row], None)
