"""Each grid run in a child process of its own (peftlab.lab.isolate): results and exceptions come back, a killed
child is named, and a run's recorded memory no longer includes what the grid's process holds."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from peftlab.config import ConfigError
from peftlab.lab import compare as compare_mod
from peftlab.lab.compare import add_parser, compare
from peftlab.lab.compare_grid import load_grid
from peftlab.lab.isolate import RunProcessError, run_isolated
from peftlab.lab.results import resident_memory


def test_the_result_comes_back_from_another_process():
    assert run_isolated("pid", os.getpid) != os.getpid()
    assert run_isolated("power", pow, 2, exp=10) == 1024


def test_an_exception_keeps_its_type_and_carries_the_childs_traceback(tmp_path):
    with pytest.raises(ConfigError, match="cannot read grid file") as caught:
        run_isolated("a grid", load_grid, tmp_path / "missing.yaml")
    assert any("in the process of a grid" in note and "load_grid" in note for note in caught.value.__notes__)


@pytest.mark.parametrize(("fn", "arg", "message"), [
    (os._exit, 3, r"lora--x: the run's process exited with code 3 without a result; .*resumes it"),
    (signal.raise_signal, signal.SIGKILL, r"lora--x: the run's process was killed by SIGKILL \(the kernel's "
                                          r"out-of-memory killer"),
])
def test_a_child_that_dies_without_a_result_is_named(fn, arg, message):
    with pytest.raises(RunProcessError, match=message):
        run_isolated("lora--x", fn, arg)


ORPHAN_SCRIPT = """
import os, signal, sys, time
from peftlab.lab.isolate import run_isolated

# A terminal's Ctrl-C default: a test runner started in the background (cmd &) hands its children SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)

def report_and_sleep(path):
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(300)

if __name__ == "__main__":
    try:
        run_isolated("sleeper", report_and_sleep, sys.argv[1])
    except KeyboardInterrupt:
        sys.exit(130)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for this purpose
        return f.read().split(") ")[-1][0] != "Z"


# The interrupt arrives just as Process.start() returns, before run_isolated waits on the child (a SIGINT sent as
# soon as the child is seen running: test_an_interrupt_of_the_grid_process_alone_reaches_the_child, flaky before).
EARLY_INTERRUPT = """
import multiprocessing.process, signal, sys, time
_start = multiprocessing.process.BaseProcess.start

def start(self):
    _start(self)
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.05)
    signal.raise_signal(signal.SIGINT)

multiprocessing.process.BaseProcess.start = start
"""


def _start_grid(tmp_path, prelude: str = "") -> tuple[subprocess.Popen, int]:
    """A process running a sleeping child through run_isolated; returns it and the child's pid."""
    script, pid_file = tmp_path / "grid.py", tmp_path / "child.pid"
    head, main = ORPHAN_SCRIPT.split("\nif __name__")
    script.write_text(head + prelude + "\nif __name__" + main)
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)])
    deadline = time.monotonic() + 120
    while not pid_file.exists():
        if parent.poll() is not None or time.monotonic() > deadline:
            parent.kill()
            pytest.fail("the child never started")
        time.sleep(0.1)
    return parent, int(pid_file.read_text())


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_a_child_stops_when_the_grid_process_is_killed(tmp_path):
    """The fork server outlives a killed parent while a child runs; the child must not go on training alone."""
    parent, child = _start_grid(tmp_path)
    assert _alive(child)
    parent.kill()
    parent.wait()
    assert _gone_within(child, 20), "the run's process went on after the grid's process was killed"


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_an_interrupt_of_the_grid_process_alone_reaches_the_child(tmp_path):
    """kill -INT of the grid process only (not its process group): the child is interrupted after a grace
    period, and the grid process ends with the interrupt once the child has stopped."""
    parent, child = _start_grid(tmp_path)
    try:
        parent.send_signal(signal.SIGINT)
        assert parent.wait(timeout=60) == 130
    finally:
        parent.kill()
    assert _gone_within(child, 5)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_an_interrupt_as_the_child_starts_still_reaches_it(tmp_path):
    parent, child = _start_grid(tmp_path, EARLY_INTERRUPT)
    try:
        assert parent.wait(timeout=60) == 130  # before the fix: the exit handler waited for the child (300 s)
    finally:
        parent.kill()
    assert _gone_within(child, 5)


def test_isolated_grid_runs_record_their_own_memory(tiny_llama_dir, tmp_path):
    grid = {"model": {"name": str(tiny_llama_dir)}, "task": {"name": "table-to-text"},
            "data": {"path": "demo", "max_validation": 4, "max_test": 4},
            "train": {"max_steps": 2, "batch_size": 4, "eval_examples": 0}, "eval": {"max_new_tokens": 4},
            "methods": ["lora"], "n_train": [8], "seeds": [0], "results": str(tmp_path / "results"), "name": "t"}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    ballast = bytearray(1 << 30)  # 1 GiB this process holds (as an earlier run's leftovers would), touched
    ballast[:: 4096] = b"\1" * (len(ballast) // 4096)
    results = compare(path, isolate=True)
    assert [r.grid.method for r in results] == ["zero-shot", "lora"]
    for result in results:
        start = result.train_info.start_memory_bytes
        assert start is not None and start < (1 << 30), (result.grid.stem, start)  # the ballast is not in it
        assert result.train_info.peak_memory_bytes >= start and result.run_info.process == "own"
    assert resident_memory(torch.device("cpu")) > (1 << 30)  # ... while this process held it all along
    del ballast


def test_compare_refuses_isolation_with_an_in_process_hook(tmp_path):
    with pytest.raises(ValueError, match="on_step"):
        compare_mod.run_grid([], isolate=True, on_step=lambda state: None)


def test_the_command_isolates_unless_told_in_process(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(compare_mod, "compare", lambda *args, **kwargs: seen.append(kwargs["isolate"]) or [])
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    for argv, expected in ((["compare", "g.yaml"], True), (["compare", "g.yaml", "--in-process"], False)):
        ns = parser.parse_args(argv)
        assert ns.func(ns) == 0 and seen[-1] is expected
