"""`peftlab compare --estimate`: the work counted per run equals a hand count, the estimate runs nothing, its cache is
reused, a grid records each run's prediction and the report shows predicted vs actual, bad input fails clearly."""

from __future__ import annotations

import dataclasses
import gzip
import json
import time
from pathlib import Path

import pytest
import yaml

from peftlab.config import ConfigError
from peftlab.lab import estimate as est
from peftlab.lab import experiment
from peftlab.lab.compare import compare, plan
from peftlab.lab.compare_grid import parse_grid

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = ["a fine film", "dull and slow, a long evening", "loved every minute of it", "no"]
LABELS = ["pos", "neg", "pos", "neg"]
TEST = ["great", "bad acting and a thin plot", "fine"]


def _data(tmp_path: Path) -> Path:
    folder = tmp_path / "reviews"
    folder.mkdir(exist_ok=True)
    splits = {"train": list(zip(TRAIN, LABELS, strict=True)), "validation": [(TEST[0], "pos"), (TEST[1], "neg")],
              "test": [(TEST[0], "pos"), (TEST[1], "neg"), (TEST[2], "pos")]}
    for split, rows in splits.items():
        with gzip.open(folder / f"{split}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps({"id": str(i), "text": t, "label": y}) + "\n" for i, (t, y) in enumerate(rows))
    return folder


def _grid(tmp_path: Path, model: Path, **keys) -> dict:
    return {"name": "g", "model": {"name": str(model)}, "results": str(tmp_path / "results"),
            "task": {"name": "classification", "template": "Review: {source}\nSentiment ({labels}):",
                     "max_target_tokens": 8},
            "data": {"path": str(_data(tmp_path)), "max_validation": 2, "max_test": 3},
            "train": {"batch_size": 2, "epochs": 2, "eval_every": 0, "eval_examples": 0, "log_every": 1},
            "eval": {"batch_size": 2}, "methods": ["lora"], "n_train": [4], "seeds": [0], **keys}


def _write(tmp_path: Path, grid: dict) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


RATES = est.Rates(train_positions_per_s=100.0, head_targets_per_s=0.0, prefill_positions_per_s=1000.0,
                  decode_rows_per_s=50.0, update_seconds=0.5, save_seconds=0.25, load_seconds=1.0,
                  calibration_seconds=0.1)


def _fake_measure(calls: list):
    def measure(family: est.Family) -> est.Rates:
        calls.append(family)
        return RATES
    return measure


def test_counted_work_equals_a_hand_count(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    runs = plan(parse_grid(_grid(tmp_path, tiny_llama_dir), "grid.yaml"))
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    reader = est.SplitReader()
    zero, lora = (est.count_run(r, tok, reader) for r in runs)

    def prompt(text: str) -> int:  # the template with the labels filled in (sorted: neg, pos)
        return len(tok(f"Review: {text}\nSentiment (neg, pos):").input_ids)

    label_len = {y: len(tok(y, add_special_tokens=False).input_ids) + 1 for y in ("neg", "pos")}  # + eos
    lengths = [prompt(t) + label_len[y] for t, y in zip(TRAIN, LABELS, strict=True)]
    assert lora.train_tokens == 2 * sum(lengths)  # 2 epochs over the 4 examples
    assert lora.steps == 4 and lora.saves == 1 and lora.train_rows == 4 and lora.later_rows == 4
    assert lora.all_targets == sum(label_len[y] for y in LABELS)
    # (B, T) positions of the trainer's own batches: padded to each batch's longest sequence
    assert lora.train_positions >= sum(lengths) and lora.later_positions >= sum(lengths)

    def batched(lens: list[int], size: int = 2) -> int:
        lens = sorted(lens)
        return sum(len(lens[i:i + size]) * max(lens[i:i + size]) for i in range(0, len(lens), size))

    test_prompts = [prompt(t) for t in TEST]
    continuation = sum(n - 1 for n in label_len.values())  # each label's tokens after its first, on the cache
    assert zero.eval_positions == batched(test_prompts) and zero.eval_rows == 3
    assert zero.decode_rows == 3 * continuation and zero.train_tokens == 0
    val = [prompt(TEST[0]) + label_len["pos"], prompt(TEST[1]) + label_len["neg"]]
    assert lora.eval_positions == batched(test_prompts) + batched(val)  # + one validation-loss pass at the end
    assert lora.decode_rows == 3 * continuation


def test_generation_counts_max_new_tokens_decode_steps_per_row(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    folder = tmp_path / "news"
    folder.mkdir()
    for split in ("train", "validation", "test"):
        with gzip.open(folder / f"{split}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps({"id": str(i), "article": t, "summary": "x"}) + "\n" for i, t in enumerate(TEST))
    grid = _grid(tmp_path, tiny_llama_dir, methods=[])
    grid["task"] = {"name": "summarization", "template": "{source}\nTL;DR:"}
    grid["data"]["path"] = str(folder)
    grid["eval"]["max_new_tokens"] = 5
    zero, lead3 = plan(parse_grid(grid, "grid.yaml"))
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    work = est.count_run(zero, tok, est.SplitReader())
    # zero-shot: every output to the cap. Continuous batching at 2 rows: 2 prompts, 4 decode steps after the prompt
    # pass's token; then the third prompt refills a row and decodes alone (the finished row is dropped).
    assert work.decode_rows == 3 * 4 and work.decode_steps == {"2": 4, "1": 4}
    assert sorted(work.prompt_passes) == ["1", "2"] and work.prompt_passes["1"][0] == 1
    assert est.count_run(lead3, tok, est.SplitReader()).eval_rows == 0  # lead-3 runs no model


def test_a_trained_run_generates_outputs_as_long_as_its_targets(tmp_path, tiny_llama_dir):
    """A trained model writes about what it was trained on: its test outputs are replayed at each example's
    training-target length (eos not counted), through continuous batching's refills."""
    from peftlab.evaluation.schedule import generation_schedule

    folder = tmp_path / "news"
    folder.mkdir()
    summaries = ["x", "a much longer summary of it", "two words"]
    for split in ("train", "validation", "test"):
        with gzip.open(folder / f"{split}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps({"id": str(i), "article": t, "summary": y}) + "\n"
                         for i, (t, y) in enumerate(zip(TEST, summaries, strict=True)))
    grid = _grid(tmp_path, tiny_llama_dir, baselines=False)
    grid["task"] = {"name": "summarization", "template": "{source}\nTL;DR:"}
    grid["data"]["path"] = str(folder)
    grid["eval"]["max_new_tokens"] = 5
    (lora,) = plan(parse_grid(grid, "grid.yaml"))
    tok = _tok(tiny_llama_dir)
    work = est.count_run(lora, tok, est.SplitReader())
    prompts = [len(tok(f"{t}\nTL;DR:").input_ids) for t in TEST]
    outputs = [len(tok(y, add_special_tokens=False).input_ids) for y in summaries]
    order = sorted(range(3), key=lambda i: prompts[i])
    replay = generation_schedule([prompts[i] for i in order], [outputs[i] for i in order], 5, 2)
    assert work.decode_rows == sum(replay.steps) < 3 * 4  # some outputs end before the cap
    assert work.decode_steps == {str(rows): replay.steps.count(rows) for rows in set(replay.steps)}


def test_passes_are_priced_by_their_rows():
    """A one-row pass at the one-row rate, a full batch's at the batch rate, others between (prompt passes in log
    rows, decode steps linear in rows)."""
    rates = est.Rates(prefill_positions_per_s=1600.0, prefill_one_positions_per_s=400.0, decode_rows_per_s=160.0,
                      decode_one_rows_per_s=20.0, eval_rows=16)
    work = est.Work()
    work.prompt_pass(1, 100)
    assert est.evaluation_seconds(work, rates) == pytest.approx(100 / 400)
    work = est.Work()
    work.prompt_pass(16, 1600)
    work.prompt_pass(4, 400)  # log 4 / log 16 = halfway: 400 * (1600/400) ** 0.5 = 800 positions/s
    assert est.evaluation_seconds(work, rates) == pytest.approx(1600 / 1600 + 400 / 800)
    work = est.Work()
    work.decode(1, 10)
    work.decode(16, 10)
    work.decode(6, 3)  # a step of 1 row: 0.05 s, of 16: 0.1 s; 6 rows: a third of the way
    assert est.evaluation_seconds(work, rates) == pytest.approx(10 * 0.05 + 10 * 0.1 + 3 * (0.05 + 0.05 / 3))
    # rates measured at one batch size only (an older cache): every pass at the batch rate
    flat = est.Rates(prefill_positions_per_s=1600.0, decode_rows_per_s=160.0)
    work = est.Work()
    work.prompt_pass(1, 100)
    work.decode(2, 5)
    assert est.evaluation_seconds(work, flat) == pytest.approx(100 / 1600 + 10 / 160)
    # the generation loop's own work is paid once per decode step, whatever its rows
    looped = dataclasses.replace(flat, loop_step_seconds=0.01)
    assert est.evaluation_seconds(work, looped) == pytest.approx(100 / 1600 + 10 / 160 + 5 * 0.01)


def test_estimate_runs_nothing_writes_no_results_and_reuses_its_cache(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise AssertionError("--estimate must not run anything")

    monkeypatch.setattr(experiment, "train_run", fail)
    monkeypatch.setattr(experiment, "eval_run", fail)
    calls: list = []
    monkeypatch.setattr(est, "measure_family", _fake_measure(calls))
    path = _write(tmp_path, _grid(tmp_path, tiny_llama_dir))
    assert compare(path, estimate=True) == []
    out = capsys.readouterr().out
    assert "zero-shot--default--n0--seed0" in out and "lora--default--n4--seed0" in out
    assert "predicted total" in out and "expected finish" in out and "calibrated 2 families" in out
    assert sorted(f.train for f in calls) == [False, True]
    root = tmp_path / "results" / "g"
    assert [p.name for p in root.iterdir()] == ["estimate"]  # no result file, no run folder
    # LoRA merges for evaluation, so its evaluation is the base model's; training: 4 steps
    lora = next(r for r in est.estimate_grid(plan(parse_grid(_grid(tmp_path, tiny_llama_dir), "g")),
                                             root / est.CACHE_NAME, measure=fail).runs if r.kind == "train")
    w = lora.work
    expected_train = 4 * 0.5 + (w.train_positions + w.later_positions) / 100.0
    assert lora.seconds["train"] == pytest.approx(expected_train)
    assert lora.seconds["evaluation"] == pytest.approx(w.eval_positions / 1000.0 + w.decode_rows / 50.0)
    assert lora.seconds["overhead"] == pytest.approx(1.0 + w.data_seconds + 0.25)

    monkeypatch.setattr(est, "measure_family", fail)  # second time: everything from the cache
    t0 = time.perf_counter()
    compare(path, estimate=True)
    assert "rates from the cache" in capsys.readouterr().out and time.perf_counter() - t0 < 5


def test_a_grid_records_predictions_and_the_report_shows_predicted_vs_actual(tmp_path, tiny_llama_dir, capsys):
    from peftlab.lab.report import build_blocks
    from peftlab.lab.report_render import to_markdown

    grid = _grid(tmp_path, tiny_llama_dir, baselines=False)
    grid["train"]["max_steps"] = 2
    t0 = time.perf_counter()
    results = compare(_write(tmp_path, grid))  # the real calibration, on the tiny model
    assert "[estimate] predicted total" in capsys.readouterr().out
    predicted = json.loads((tmp_path / "results" / "g" / est.PREDICTED_NAME).read_text())
    assert list(predicted) == [r.grid.stem for r in results]
    assert all(p["predicted_seconds"] > 0 for p in predicted.values())
    lora = results[0]
    work = est.count_run(plan(parse_grid(grid, "g"))[0], _tok(tiny_llama_dir), est.SplitReader())
    assert lora.train_info.train_input_tokens == work.train_tokens  # the trainer counted what we counted
    assert time.perf_counter() - t0 < 60
    md = to_markdown(build_blocks(tmp_path / "results"), "files")
    section = md.split("Predicted vs actual time")[1]
    assert "lora N=4" in section and "total" in section and "actual / predicted" in section
    # Each run records its process's CPU time, and the report shows the share of its cores it had.
    info = lora.run_info
    assert 0 < info.cpu_seconds and "CPU share" in section
    share = info.cpu_seconds / ((info.finished - info.started) * info.machine["torch_threads"])
    row = next(line for line in section.splitlines() if line.startswith("| lora N=4"))
    assert row.split("|")[6].strip() == f"{share:.0%}"


def _tok(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_real_calibration_on_the_tiny_model_is_quick_and_positive(tmp_path, tiny_llama_dir):
    grid = _grid(tmp_path, tiny_llama_dir, methods=[{"name": "prompt-tuning", "options": {"n_tokens": 6}},
                                                    "last-layer", "lora"])
    runs = plan(parse_grid(grid, "g"))
    t0 = time.perf_counter()
    prompt, last, lora = (est.measure_family(est.Family(r.cfg, True, 32, 2, 32)) for r in runs[1:])
    assert time.perf_counter() - t0 < 10
    assert prompt.virtual_positions == 6 and lora.virtual_positions == 0
    # a soft prompt changes the evaluation forward: measured; LoRA is merged for evaluation: the base model's
    assert not prompt.eval_as_base and prompt.prefill_positions_per_s > 0 and prompt.decode_rows_per_s > 0
    # and at one row (eval.batch_size is 2 here), for refills and a batch's last rows
    assert prompt.eval_rows == 2 and prompt.prefill_one_positions_per_s > 0 and prompt.decode_one_rows_per_s > 0
    assert prompt.loop_step_seconds > 0  # timed inside the generation loop, whose own work is measured too
    assert lora.eval_as_base and lora.prefill_positions_per_s == 0
    assert prompt.train_positions_per_s > 0 and prompt.update_seconds > 0 and lora.head_targets_per_s == 0
    # last-layer's trunk is frozen: later epochs are served by the trunk cache, at the head's own rate
    assert last.cache_bytes_per_target > 0 and last.head_targets_per_s > 0


def test_bad_input_fails_clearly(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    monkeypatch.setattr(est, "measure_family", _fake_measure([]))
    path = _write(tmp_path, _grid(tmp_path, tiny_llama_dir))
    with pytest.raises(ConfigError, match="--estimate and --dry-run"):
        compare(path, dry_run=True, estimate=True)
    # a broken cache is only a cache: said once, then measured again
    root = tmp_path / "results" / "g"
    (root / est.CACHE_NAME).parent.mkdir(parents=True)
    (root / est.CACHE_NAME).write_text("{not json")
    compare(path, estimate=True)
    assert "unreadable" in capsys.readouterr().out and json.loads((root / est.CACHE_NAME).read_text())["rates"]
    # data that cannot be read names the run
    grid = _grid(tmp_path, tiny_llama_dir)
    grid["data"]["path"] = str(tmp_path / "missing")
    with pytest.raises(est.EstimateError, match=r"run zero-shot--default--n0--seed0"):
        compare(_write(tmp_path, grid), estimate=True)


def test_forgetting_passes_are_counted(tmp_path, tiny_llama_dir):
    """Zero-shot scores the forgetting sample once; a training run twice (before and after)."""
    import random

    from transformers import AutoTokenizer

    forgetting = {"forgetting_data": str(_data(tmp_path)), "forgetting_field": "text", "forgetting_examples": 2,
                  "forgetting_tokens": 3}
    plain = plan(parse_grid(_grid(tmp_path, tiny_llama_dir), "grid.yaml"))
    runs = plan(parse_grid(_grid(tmp_path, tiny_llama_dir, eval={"batch_size": 2, **forgetting}), "grid.yaml"))
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    texts = [TEST[i] for i in sorted(random.Random(0).sample(range(len(TEST)), 2))]
    lengths = [min(3, len(tok(t, add_special_tokens=False).input_ids)) for t in texts]
    lengths = [n for n in lengths if n >= 2]  # a one-token text has nothing to predict and is dropped
    one_pass = len(lengths) * max(lengths)  # one batch, padded to the longest
    for before, after, passes in zip(plain, runs, (1, 2), strict=True):
        old, new = est.count_run(before, tok, est.SplitReader()), est.count_run(after, tok, est.SplitReader())
        assert new.eval_positions - old.eval_positions == passes * one_pass
        assert new.eval_rows - old.eval_rows == passes * len(lengths)


def test_min_steps_is_counted_as_the_trainer_counts_it(tmp_path, tiny_llama_dir):
    """IMDB's N=100 runs train at least 50 steps (train.min_steps) over 13 batches: the estimate once counted 13."""
    from peftlab.training.trainer import planned_steps

    grid = _grid(tmp_path, tiny_llama_dir)
    grid["train"].update(epochs=1, min_steps=5)  # 4 examples at batch 2: 2 steps an epoch, at least 5
    lora = plan(parse_grid(grid, "grid.yaml"))[1]
    work = est.count_run(lora, _tok(tiny_llama_dir), est.SplitReader())
    assert work.steps == 5 == planned_steps(lora.cfg.train, 4)
    assert work.train_rows + work.later_rows == 10  # 5 micro-batches of 2: the data goes round 2.5 times


@pytest.mark.parametrize("rows", [2, 4, 16, 32])
def test_the_calibration_loop_times_every_kind_of_pass(rows):
    """The output lengths the calibration generates make the loop run what the estimate prices: a full batch's
    prompt pass, one-row refills, decode steps of every row and of one row."""
    from peftlab.evaluation.schedule import generation_schedule
    from peftlab.lab.calibrate import loop_plan

    ends = loop_plan(rows)
    replay = generation_schedule([50] * len(ends), ends, max(ends) + 1, rows)
    assert [n for n, _ in replay.passes].count(rows) == 1 and [n for n, _ in replay.passes].count(1) >= rows // 2
    assert replay.steps.count(rows) >= 3 and replay.steps.count(1) >= 3


def test_calibration_of_a_model_without_a_slot_cache_times_whole_batches(monkeypatch, tmp_path, tiny_llama_dir):
    """A model whose KV cache continuous batching cannot use (sliding-window layers, ...) decodes batch after batch,
    where output lengths cannot be set: the calibration still measures its rates, every row decoded to the end."""
    import peftlab.evaluation.generate as generate_module

    monkeypatch.setattr(generate_module, "to_slots", lambda *args, **kwargs: None)
    run = plan(parse_grid(_grid(tmp_path, tiny_llama_dir, methods=["lora"]), "g"))[0]
    rates = est.measure_family(est.Family(run.cfg, False, 0, 0, 32))
    assert rates.prefill_positions_per_s > 0 and rates.decode_rows_per_s > 0 and rates.loop_step_seconds >= 0
