"""Grid shards (``compare --shard k/n``): every run in exactly one shard, lead-3 beside its zero-shot run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peftlab.config import ConfigError
from peftlab.lab.shard import parse_shard, select_shard, shard_units

KINDS = ["zero-shot", "lead-3"] + ["train"] * 9


@pytest.mark.parametrize("text, expected", [("1/1", (1, 1)), ("2/8", (2, 8)), (" 3 / 3 ", (3, 3))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/0", "", "-1/2"])
def test_bad_shards_name_the_option_and_the_form(text):
    with pytest.raises(ConfigError, match=r"--shard: expected k/n with 1 <= k <= n"):
        parse_shard(text)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 11, 20])
def test_every_run_is_in_exactly_one_shard(n):
    runs = list(range(len(KINDS)))
    shards = [select_shard(runs, KINDS, k, n) for k in range(1, n + 1)]
    assert sorted(r for shard in shards for r in shard) == runs
    assert all(shard == sorted(shard) for shard in shards)  # the grid's order within a shard
    assert [0, 1] in [shard[:2] for shard in shards]  # lead-3 runs where zero-shot runs
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 2  # balanced up to the two-run baseline unit


def test_units_keep_lead3_with_zero_shot_wherever_it_stands():
    assert shard_units(["train", "zero-shot", "train", "lead-3"]) == [0, 1, 2, 1]
    assert shard_units(["train", "lead-3"]) == [0, 1]  # no zero-shot in this grid: lead-3 stands alone


def _compare(grid: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "peftlab.cli", "compare", str(grid), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out
    return out


def test_two_shards_in_two_processes_cover_the_grid_once_like_one_process(tiny_llama_dir, tmp_path):
    grid = {"model": {"name": str(tiny_llama_dir)}, "task": {"name": "table-to-text"}, "name": "g",
            "data": {"path": "demo", "max_validation": 4, "max_test": 4},
            "train": {"max_steps": 2, "batch_size": 4, "eval_examples": 0},
            "eval": {"max_new_tokens": 4, "show_examples": 1},
            "methods": [{"name": "lora", "variants": {"r": [2, 4]}}, "last-layer"], "n_train": [8], "seeds": [0]}
    paths = {}
    for folder in ("sharded", "single"):
        paths[folder] = tmp_path / f"{folder}.yaml"
        paths[folder].write_text(yaml.safe_dump({**grid, "results": str(tmp_path / folder)}))
    shards = [_compare(paths["sharded"], "--shard", f"{k}/2") for k in (1, 2)]  # at the same time
    logs = [_finish(p) for p in shards]
    _finish(_compare(paths["single"]))
    sharded, single = tmp_path / "sharded" / "g", tmp_path / "single" / "g"
    stems = sorted(p.stem for p in single.glob("*.json"))
    assert len(stems) == 4 and sorted(p.stem for p in sharded.glob("*.json")) == stems
    ran = [stem for log in logs for stem in stems if f"{stem} done in" in log]
    assert sorted(ran) == stems  # each run ran in exactly one shard
    for stem in stems:
        a, b = (json.loads((root / f"{stem}.json").read_text()) for root in (sharded, single))
        assert a["metrics"] == b["metrics"] and a["grid"] == b["grid"]
        if a["kind"] == "train":
            assert (sharded / "runs" / stem / "adapter" / "adapter.safetensors").read_bytes() == (
                single / "runs" / stem / "adapter" / "adapter.safetensors").read_bytes()
