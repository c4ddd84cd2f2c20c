"""Faults (issue 10), the fast versions of benchmarks/faults.py's rows: kill -9 and resume, metrics.jsonl after a
kill, the run-folder lock, non-finite steps, a full disk mid-checkpoint, out of memory, and pickle-free checkpoints.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_training import _toy_data, _trainer

from peftlab import durable
from peftlab.training import checkpoint as ckpt
from peftlab.training.metrics_log import MetricsLog
from peftlab.training.run_lock import FolderLockedError, folder_lock
from peftlab.training.trainer import NonFiniteError, Trainer, TrainingOutOfMemoryError

# ------------------------------------------------------------------------------------ kill -9 of a real process


def _train_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [f"model={model_dir}", "task=table-to-text", "data=demo", "method=lora", "data.max_train=16",
            "data.max_validation=2", "data.max_test=1", "eval.max_new_tokens=2", "train.max_steps=8",
            "train.batch_size=2", "train.save_every=1", "train.log_every=1", "train.eval_every=3", "train.device=cpu",
            f"out={out}", *extra]


def _train_in_process(model_dir: Path, out: Path, *extra: str) -> None:
    """The reference and the resumed runs run here (a subprocess costs seconds of imports); only the run that is
    killed needs a process of its own."""
    from peftlab.config import load_config
    from peftlab.lab.experiment import train_run

    train_run(load_config(None, _train_args(model_dir, out, *extra)))


def _records(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in MetricsLog(
        out / "metrics.jsonl").records()]


@pytest.fixture(scope="module")
def reference_run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "reference"
    _train_in_process(tiny_llama_dir, out)
    return out


@pytest.mark.parametrize("trial", [0, 1])
def test_kill_9_then_resume_gives_the_same_adapter_and_metrics(tiny_llama_dir, reference_run, tmp_path, trial):
    rng = random.Random(trial)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "peftlab.cli", "train", *_train_args(tiny_llama_dir, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step = rng.randint(2, 7)
    # Trial 0 is killed as checkpoint `step` is being written (its temp folder appears), trial 1 right after.
    want = f".step-{step:07d}." if trial == 0 else f"step-{step:07d}"
    while proc.poll() is None and not any(n.startswith(want) for n in _names(out / "checkpoints")):
        time.sleep(0.0002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() != 0, "the run finished before the kill: nothing was tested"
    _train_in_process(tiny_llama_dir, out, "resume=true")
    adapter = "adapter/adapter.safetensors"
    assert (out / adapter).read_bytes() == (reference_run / adapter).read_bytes()
    assert _records(out) == _records(reference_run)  # each step once, none missing
    assert not [n for n in _names(out / "checkpoints") if n.startswith(".")]


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


# ------------------------------------------------------------------------------------ metrics.jsonl


def test_metrics_log_drops_a_partial_last_line_and_cuts_back_to_a_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"step": 1, "loss": 1.0})
    size = log.sync()
    log.append({"step": 2, "loss": 0.5})
    with log.path.open("a") as f:
        f.write('{"step": 3, "lo')  # killed mid-write
    assert [r["step"] for r in log.records()] == [1, 2]
    log.truncate_to(size)
    assert [r["step"] for r in log.records()] == [1] and log.path.read_text().endswith("\n")


def test_resume_cuts_metrics_back_to_the_checkpoints_length(tmp_path):
    def crash(state):
        if state.step == 5:
            raise NonFiniteError("stop")  # any exception: the loop stops after checkpoint 5

    with pytest.raises(NonFiniteError):
        _trainer(tmp_path, on_step=crash, save_every=1).fit()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "split": "train", "loss": 9.0}\n{"step": 7, "sp')  # a later step, then a partial line
    resumed = _trainer(tmp_path, save_every=1)
    assert resumed.resume() and resumed.state.step == 5
    resumed.fit()
    steps = [r["step"] for r in resumed.log.records() if r.get("split") == "train"]
    assert steps == [2, 4, 6, 8]


# ------------------------------------------------------------------------------------ the run-folder lock

HOLD = "import sys, time; from peftlab.training.run_lock import folder_lock\nwith folder_lock(sys.argv[1]):\n" \
       "    print('held', flush=True); time.sleep(60)"


def test_a_second_process_is_refused_and_a_killed_holder_does_not_block(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(FolderLockedError, match=rf"{tmp_path}.*pid {holder.pid}"), folder_lock(tmp_path):
            pass
        assert time.monotonic() - t0 < 1.0  # refused at once, not after a wait
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".lock").exists()  # the stale lock file stays ...
    with folder_lock(tmp_path):  # ... and does not block
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())


def test_an_out_that_is_a_file_is_one_error(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(FolderLockedError, match="is a file"), folder_lock(tmp_path / "out"):
        pass


def test_train_run_holds_the_lock(tiny_llama_dir, tmp_path):
    from peftlab.config import load_config
    from peftlab.lab.experiment import train_run

    cfg = load_config(None, [f"model={tiny_llama_dir}", "data=demo", f"out={tmp_path}", "train.max_steps=1"])
    with folder_lock(tmp_path), pytest.raises(FolderLockedError, match="out: .* is in use"):
        train_run(cfg)


def test_eval_run_and_compare_hold_their_locks(tiny_llama_dir, tmp_path):
    from peftlab.config import load_config
    from peftlab.lab.compare import compare
    from peftlab.lab.experiment import eval_run

    cfg = load_config(None, [f"model={tiny_llama_dir}", "data=demo", f"out={tmp_path / 'eval'}"])
    with folder_lock(tmp_path / "eval"), pytest.raises(FolderLockedError, match="out: .* is in use"):
        eval_run(cfg)
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"name: g\nmodel: {{name: {tiny_llama_dir}}}\ndata: {{path: demo}}\nmethods: [lora]\n"
                    f"baselines: false\nresults: {tmp_path / 'results'}\n")
    with folder_lock(tmp_path / "results" / "g"), pytest.raises(FolderLockedError, match="results: .* is in use"):
        compare(grid)


# ------------------------------------------------------------------------------------ non-finite steps


def _nan_at_step(monkeypatch, step: int) -> None:
    original = Trainer._forward_loss

    def forward_loss(self, batch, rows=None):
        loss, n = original(self, batch, rows)
        return (loss * float("nan"), n) if self.model.training and self.state.step + 1 == step else (loss, n)

    monkeypatch.setattr(Trainer, "_forward_loss", forward_loss)


def test_a_nan_loss_stops_naming_the_step_and_the_intact_checkpoint(tmp_path, monkeypatch):
    _nan_at_step(monkeypatch, 4)
    trainer = _trainer(tmp_path, save_every=1)
    with pytest.raises(NonFiniteError, match=r"step 4: .*step-0000003 is intact"):
        trainer.fit()
    folder = ckpt.latest_checkpoint(tmp_path)
    assert folder.name == "step-0000003"
    weights = ckpt.load_checkpoint(folder)[0]
    # The bad gradient never reached the weights, and the checkpoint holds what the model held after step 3.
    assert all(torch.isfinite(p).all() for p in trainer.params.values())
    assert all(torch.equal(weights[k], trainer.params[k].detach()) for k in weights)


def test_skip_nonfinite_skips_the_update_and_counts_it(tmp_path, monkeypatch):
    _nan_at_step(monkeypatch, 4)
    trainer = _trainer(tmp_path, skip_nonfinite=True)
    state = trainer.fit()
    assert state.step == 8 and state.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in trainer.params.values())
    assert [r["step"] for r in trainer.log.records() if r.get("event") == "skipped_nonfinite"] == [4]


# ------------------------------------------------------------------------------------ full disk, read-only


def test_a_full_disk_mid_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    straight = _trainer(tmp_path / "a", save_every=1)
    straight.fit()
    real = durable.save_tensors

    def fills_up(tensors, path, metadata=None):
        if "step-0000004" in str(path.parent):
            Path(path).write_bytes(b"\0" * 100)  # part of the file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(tensors, path, metadata)

    monkeypatch.setattr(ckpt, "save_tensors", fills_up)
    with pytest.raises(durable.DiskWriteError, match=r"No space left on device; the last good checkpoint .*"
                                                     r"step-0000003 is intact"):
        _trainer(tmp_path / "b", save_every=1).fit()
    assert ckpt.latest_checkpoint(tmp_path / "b").name == "step-0000003"
    assert not [n for n in os.listdir(tmp_path / "b" / "checkpoints") if n.startswith(".")]
    monkeypatch.setattr(ckpt, "save_tensors", real)
    resumed = _trainer(tmp_path / "b", save_every=1)
    assert resumed.resume() and resumed.state.step == 3
    resumed.fit()
    assert all(torch.equal(resumed.params[k], p) for k, p in straight.params.items())


def test_a_read_only_folder_is_one_error_naming_the_path(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    durable.atomic_write_json(target, {"v": 1})

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(durable.tempfile, "mkstemp", read_only)
    with pytest.raises(durable.DiskWriteError, match=rf"{target}: Read-only file system"):
        durable.atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}


def test_tensor_files_get_the_usual_permissions(tmp_path):
    durable.save_tensors({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
    (tmp_path / "y.json").write_text("{}")
    assert (tmp_path / "x.safetensors").stat().st_mode & 0o777 == (tmp_path / "y.json").stat().st_mode & 0o777


def test_safetensors_io_errors_surface_as_oserror(tmp_path, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as info:
        durable.save_tensors({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
    assert info.value.errno == errno.ENOSPC and durable.is_disk_error(info.value)


# ------------------------------------------------------------------------------------ out of memory


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't "
                                                "allocate memory: you tried to allocate 123 bytes")])
def test_out_of_memory_names_the_batch_and_what_to_lower(tmp_path, monkeypatch, error):
    def oom(self, batch, rows=None):
        raise error

    monkeypatch.setattr(Trainer, "_forward_loss", oom)
    with pytest.raises(TrainingOutOfMemoryError) as info:
        _trainer(tmp_path).fit()
    message = str(info.value)
    for needle in ("step 1", "train.batch_size=4", "tokens", "train.grad_accum", "task.max_source_tokens",
                   "train.gradient_checkpointing=true"):
        assert needle in message


def test_other_runtime_errors_pass_through(tmp_path, monkeypatch):
    def broken(self, batch, rows=None):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(Trainer, "_forward_loss", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        _trainer(tmp_path).fit()


# ------------------------------------------------------------------------------------ checkpoints without pickle


def test_trainer_state_round_trips_exactly_without_pickle(tmp_path):
    trainer = _trainer(tmp_path, save_every=1, max_steps=2)
    trainer.fit()
    folder = ckpt.latest_checkpoint(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["best.safetensors", "state.json", "trainer.json",
                                                        "trainer.safetensors", "weights.safetensors"]
    _, _, state, _ = ckpt.load_checkpoint(folder)
    want = trainer.optimizer.state_dict()
    assert state["optimizer"]["param_groups"] == want["param_groups"]  # tuples (betas) and all
    for k, v in want["state"].items():
        assert all(torch.equal(state["optimizer"]["state"][k][name], t) for name, t in v.items())
    assert state["scheduler"] == trainer.scheduler.state_dict()


def test_an_old_pickled_checkpoint_is_refused_unread(tmp_path):
    trainer = _trainer(tmp_path, save_every=1, max_steps=1)
    trainer.fit()
    folder = ckpt.latest_checkpoint(tmp_path)
    (folder / "trainer.json").unlink()
    (folder / "trainer.pt").write_bytes(b"not even a pickle")
    with pytest.raises(ckpt.OldCheckpointError, match="restart the run"):
        Trainer(trainer.method, _toy_data(), [], trainer.cfg, tmp_path, pad_id=1, lr=1e-2).resume()
