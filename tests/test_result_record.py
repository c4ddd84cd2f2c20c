"""The result record: one reader that reads every result file peftlab has written, one writer that writes the
same JSON back, and clear errors for what is not a result (no training; the committed study results and the
shapes of earlier writers are the fixtures)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from peftlab.lab.result_record import (
    SCHEMA_VERSION,
    GridCell,
    MethodFacts,
    ResultError,
    ResultRecord,
    RunInfo,
    TrainInfo,
    ValPoint,
    read_result,
    write_result,
)

STUDIES = Path(__file__).resolve().parents[1] / "studies"


def _study_results() -> list[Path]:
    paths = []
    for path in sorted(STUDIES.rglob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "metrics" in data:  # not estimate caches, configs, checkpoints
            paths.append(path)
    return paths


def test_every_committed_study_result_reads_and_writes_back_byte_for_byte(tmp_path):
    paths = _study_results()
    if not paths:
        pytest.skip("no studies/ results in this checkout")
    kinds = set()
    for path in paths:
        record = read_result(path)
        kinds.add(record.kind)
        copy_path = tmp_path / path.relative_to(STUDIES)
        write_result(copy_path, record)
        assert copy_path.read_text() == path.read_text(), path
    assert {"train", "eval"} <= kinds


def _contained(old: Any, new: Any, where: str = "") -> None:
    """Every key and value of ``old`` is in ``new`` (``new`` may add keys: the current writer's nulls)."""
    if isinstance(old, dict):
        assert isinstance(new, dict), where
        for key, value in old.items():
            assert key in new, f"{where}.{key} lost"
            _contained(value, new[key], f"{where}.{key}")
    else:
        assert old == new, where


RUN_INFO = {"command": "peftlab train configs/e2e_lora.yaml", "config": {
    "task": {"name": "table-to-text"}, "method": {"name": "lora", "options": {"r": 8}}, "adapter": None},
    "versions": {"python": "3.11.2", "torch": "2.5.1"}, "machine": {"cpu": "x", "cpu_count": 2, "device": "cpu"},
    "seed": 0, "git_commit": None, "started": 1.7e9, "finished": 1.7e9 + 60}
# The first train writer (commit 3f8e870): no world_size, skipped_nonfinite_steps, trunk_cache, train_trunk_tokens,
# forgetting or per_example; no grid.
FIRST_TRAIN = {
    "schema_version": 1, "kind": "train", "run_info": RUN_INFO,
    "train_info": {"method": {"name": "lora", "r": 8, "targets": ["q_proj", "v_proj"]}, "trainable_params": 100,
                   "total_params": 10_000, "trainable_percent": 1.0, "lr": 2e-4, "steps": 20, "epochs_completed": 2.0,
                   "train_examples": 40, "train_seconds": 30.0, "epoch_seconds": [15.0, 15.0],
                   "train_input_tokens": 4000, "train_target_tokens": 400, "train_tokens_per_s": 133.3,
                   "eval": {"test": {"eval_seconds": 3.0, "eval_examples_per_s": 2.0}},
                   "peak_memory_bytes": 2**30, "peak_memory_kind": "cpu_peak_rss", "train_flops_estimate": 12345,
                   "adapter_bytes": 4096, "loss_curve": [[10, 2.5], [20, 2.0]],
                   "val_curve": [{"step": 10, "loss": 2.4, "bleu": 12.0}, {"step": 20, "loss": 2.1, "bleu": 15.0}],
                   "best_step": 20, "early_stop_step": None},
    "metrics": {"test": {"bleu": 15.0, "rougeL": 30.0, "n_examples": 6}},
    "samples": {"test": [{"id": "0", "source": "name[x]", "prediction": "x is", "references": ["x is a pub."]}]}}
# The first eval writer: method, parameter counts, eval speed, peak memory; no forgetting.
FIRST_EVAL = {
    "schema_version": 1, "kind": "eval", "run_info": RUN_INFO,
    "train_info": {"method": {"name": "zero-shot"}, "trainable_params": 0, "total_params": 10_000,
                   "trainable_percent": 0.0, "eval": {"test": {"eval_seconds": 3.0, "eval_examples_per_s": 2.0}},
                   "peak_memory_bytes": 2**30, "peak_memory_kind": "cpu_peak_rss"},
    "metrics": {"test": {"rouge1": 20.0, "n_examples": 6, "baselines": {"lead-3": {"rouge1": 30.0}}}},
    "samples": {"test": []},
    "grid": {"method": "zero-shot", "variant": "default", "n_train": 0, "seed": 0, "budget": None,
             "stem": "zero-shot--default--n0--seed0"}}
# compare's first lead-3 (commit ec1f834): derived from the zero-shot run, no per-example records.
FIRST_LEAD3 = {
    "schema_version": 1, "kind": "baseline", "run_info": {**RUN_INFO, "derived_from": "zero-shot--default--n0--seed0"},
    "train_info": {"method": {"name": "lead-3"}, "trainable_params": 0, "total_params": 0, "trainable_percent": 0.0},
    "metrics": {"test": {"rouge1": 30.0, "n_examples": 6}}, "samples": {},
    "grid": {"method": "lead-3", "variant": "default", "n_train": 0, "seed": 0, "budget": None,
             "stem": "lead-3--default--n0--seed0"}}
# A diverged learning-rate pilot as compare wrote it before this module: no schema_version.
DIVERGED_PILOT = {
    "kind": "pilot", "diverged": "train: step 1: the loss (nan) ...",
    "run_info": {"config": RUN_INFO["config"], "command": "peftlab compare g.yaml (pilot--lora--lr0.1)"},
    "train_info": {"val_curve": []}, "metrics": {},
    "grid": {"method": "lora", "variant": "default", "n_train": 8, "seed": 0, "budget": None, "lr": 0.1,
             "factor": 100.0, "extend": 0, "stem": "pilot--lora--lr0.1"}}
# A baseline file that holds metrics alone (the report's own tests write these).
METRICS_ONLY = {"metrics": {"test": {"rouge1": 30.0, "rougeL": 19.5}}}


@pytest.mark.parametrize("data", [FIRST_TRAIN, FIRST_EVAL, FIRST_LEAD3, DIVERGED_PILOT, METRICS_ONLY],
                         ids=["first-train", "first-eval", "first-lead3", "diverged-pilot", "metrics-only"])
def test_files_of_earlier_writers_read_and_keep_every_key(data):
    record = ResultRecord.from_dict(copy.deepcopy(data), "old.json")
    written = record.to_dict()
    _contained(data, written)
    assert written["schema_version"] == SCHEMA_VERSION
    assert ResultRecord.from_dict(written) == record  # the reader reads what the writer writes
    assert record.records_of("test") is None and record.train_info.forgetting is None


def test_fields_of_an_old_file_are_typed():
    train = ResultRecord.from_dict(FIRST_TRAIN)
    info = train.train_info
    assert info.method_name == "lora" and info.method.facts == {"r": 8, "targets": ["q_proj", "v_proj"]}
    assert info.val_curve[1] == ValPoint(step=20, loss=2.1, metrics={"bleu": 15.0})
    assert info.eval["test"].eval_examples_per_s == 2.0 and info.world_size is None
    assert train.run_info.config_value("method", "options") == {"r": 8} and train.run_info.git_commit is None
    assert train.metric("test", "bleu") == 15.0 and train.metrics["test"].n_examples == 6
    assert train.samples_of("test")[0].references == ["x is a pub."] and train.grid is None
    evaluated = ResultRecord.from_dict(FIRST_EVAL)
    assert evaluated.baselines_of("test") == {"lead-3": {"rouge1": 30.0}} and evaluated.samples_of("test") == []
    assert evaluated.grid.stem == "zero-shot--default--n0--seed0" and evaluated.grid.lr_pilot is None
    pilot = ResultRecord.from_dict(DIVERGED_PILOT)
    assert pilot.diverged and pilot.train_info.val_curve == [] and pilot.grid.factor == 100.0
    bare = ResultRecord.from_dict(METRICS_ONLY)
    assert bare.run_info.empty and bare.train_info.empty and bare.metric("test", "rougeL") == 19.5
    assert "run_info" not in bare.to_dict() and "samples" not in bare.to_dict()


def test_the_writer_writes_null_where_the_writers_always_did(tmp_path):
    info = TrainInfo(method=MethodFacts(name="lora"), steps=3, val_curve=[], eval={})
    assert info.to_dict() == {"method": {"name": "lora"}, "steps": 3, "val_curve": [], "eval": {},
                              "best_step": None, "early_stop_step": None, "forgetting": None}
    assert RunInfo(command="c").to_dict() == {"command": "c"}  # no versions: not a measured run, no git_commit
    cell = GridCell(method="lora", variant="default", n_train=8, seed=0)
    assert cell.to_dict() == {"method": "lora", "variant": "default", "n_train": 8, "seed": 0, "budget": None}
    record = ResultRecord(kind="eval", run_info=RunInfo(command="c"), train_info=info, grid=cell)
    write_result(tmp_path / "deep" / "r.json", record)
    assert list((tmp_path / "deep").iterdir()) == [tmp_path / "deep" / "r.json"]  # no temporary file left
    assert read_result(tmp_path / "deep" / "r.json") == record


def test_keys_of_a_newer_writer_are_kept():
    data = copy.deepcopy(FIRST_EVAL)
    data["train_info"]["forgetting"] = None  # as an eval run writes it today
    data["energy_joules"] = 12.5
    data["train_info"]["energy"] = {"gpu": 1.0}
    data["grid"]["scheduler"] = "cosine"
    data["metrics"]["test"]["chrf"] = 40.0
    record = ResultRecord.from_dict(data)
    assert record.other == {"energy_joules": 12.5} and record.train_info.other == {"energy": {"gpu": 1.0}}
    assert record.grid.other == {"scheduler": "cosine"} and record.metric("test", "chrf") == 40.0
    assert record.to_dict() == {"schema_version": 1, **{k: v for k, v in data.items() if k != "schema_version"}}


def test_what_is_not_a_readable_result_is_named(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"metrics": {"test": {}},\n "grid": }')
    with pytest.raises(ResultError, match=r"r\.json: invalid JSON at line 2 column"):
        read_result(path)
    with pytest.raises(ResultError, match=r"missing\.json: unreadable"):
        read_result(tmp_path / "missing.json")
    with pytest.raises(ResultError, match="not a peftlab result: missing key 'metrics'"):
        ResultRecord.from_dict({"train_info": {}}, "x.json")
    with pytest.raises(ResultError, match=r"x\.json: schema_version 2 is newer than this peftlab reads \(1\)"):
        ResultRecord.from_dict({**FIRST_TRAIN, "schema_version": 2}, "x.json")
    with pytest.raises(ResultError, match=r"grid record lacks \['n_train', 'seed'\]"):
        ResultRecord.from_dict({"metrics": {}, "grid": {"method": "lora", "variant": "default"}}, "x.json")
    bad = copy.deepcopy(FIRST_TRAIN)
    bad["train_info"]["eval"] = [1, 2]
    with pytest.raises(ResultError, match=r"x\.json: train_info\.eval: expected an object \(\{\.\.\.\}\), got a list"):
        ResultRecord.from_dict(bad, "x.json")
    bad = copy.deepcopy(FIRST_TRAIN)
    bad["samples"]["test"] = {"id": "0"}
    with pytest.raises(ResultError, match=r"samples\.test: expected a list"):
        ResultRecord.from_dict(bad, "x.json")


def test_run_info_derives_wall_time_and_cpu_share_only_from_recorded_numbers():
    info = RunInfo(started=100.0, finished=160.0, cpu_seconds=90.0, machine={"torch_threads": 2})
    assert info.wall_seconds() == 60.0 and info.cpu_share() == 0.75  # 90 CPU s over 60 s x 2 threads
    assert RunInfo(started=100.0, finished=160.0).cpu_share() is None  # older files: no CPU time recorded
    assert RunInfo(started=100.0, cpu_seconds=1.0, machine={"torch_threads": 1}).wall_seconds() is None
    assert RunInfo(started=100.0, finished=100.0, cpu_seconds=1.0, machine={"torch_threads": 1}).cpu_share() is None
    assert RunInfo(started=True, finished=160.0).wall_seconds() is None  # a bool is not a time
    # A resumed run: its earlier attempts' time counts in its wall time, not in its last attempt's CPU share.
    resumed = dataclasses.replace(info, earlier_seconds=240.0)
    assert resumed.wall_seconds() == 300.0 and resumed.attempt_seconds() == 60.0 and resumed.cpu_share() == 0.75
