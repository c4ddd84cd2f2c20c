"""``train.release_freed_memory``: with glibc's mmap threshold fixed, a freed multi-MiB tensor leaves the resident
set at once; with glibc's dynamic threshold the same tensor stays resident in the heap after ``del``."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from peftlab.config import TrainConfig
from peftlab.training import host_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocate, touch and free 16 MiB twice; print how much of the second tensor is still resident after its del.
PROBE = textwrap.dedent("""
    import sys, torch
    from peftlab.training.host_memory import release_freed_memory
    def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096
    if sys.argv[1] == "fixed":
        assert release_freed_memory()
    a = torch.ones(4 * 2**20); del a  # mmapped and unmapped; a dynamic threshold now rises above 16 MiB
    base = rss()
    b = torch.ones(4 * 2**20); del b
    print((rss() - base) / 2**20)
""")


def resident_after_free(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="the setting only exists in glibc's malloc")
def test_fixed_threshold_returns_freed_tensors_to_the_os():
    assert resident_after_free("dynamic") > 12  # glibc's default keeps the freed 16 MiB in the heap
    assert resident_after_free("fixed") < 1


def test_trainer_applies_the_setting_only_when_asked(monkeypatch, tmp_path):
    from conftest import tiny_llama

    from peftlab.data.encode import EncodedExample
    from peftlab.methods import get_method
    from peftlab.training import trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "release_freed_memory", lambda: calls.append(1) or True)
    spec = get_method("lora")
    method = spec.apply(tiny_llama(), spec.build_config({"r": 2}))
    data = [EncodedExample(input_ids=[2, 3, 4, 5], labels=[-100, -100, 4, 5])]
    for flag in (False, True):
        trainer_module.Trainer(method, data, [], TrainConfig(release_freed_memory=flag), tmp_path / str(flag),
                               pad_id=1, lr=1e-3)
    assert calls == [1]


def test_non_glibc_is_left_alone(monkeypatch):
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    assert host_memory.release_freed_memory() is False


# A run's peak must be its own: 200 MiB touched and freed before the reset must not count after it.
PEAK_PROBE = textwrap.dedent("""
    import torch
    from peftlab.lab.results import peak_memory, reset_peak_memory
    cpu = torch.device("cpu")
    big = torch.ones(50 * 2**20); del big  # 200 MiB
    before = peak_memory(cpu)["peak_memory_bytes"]
    assert reset_peak_memory(cpu)
    after = peak_memory(cpu)["peak_memory_bytes"]
    small = torch.ones(10 * 2**20)  # 40 MiB, held
    print(before, after, peak_memory(cpu)["peak_memory_bytes"])
""")


@pytest.mark.skipif(platform.system() != "Linux", reason="the resettable VmHWM is Linux's")
def test_peak_memory_window_restarts_at_each_run():
    out = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, check=True)
    before, after, later = (int(x) for x in out.stdout.split())
    assert before - after > 150 * 2**20  # the freed 200 MiB no longer counts
    assert later - after > 30 * 2**20  # what the new window allocates does


# What a run finds resident when it starts is what earlier runs of the process left: 200 MiB held shows, freed not.
RESIDENT_PROBE = textwrap.dedent("""
    import torch
    from peftlab.lab.results import reset_peak_memory, resident_memory
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    base = resident_memory(cpu)
    held = torch.ones(50 * 2**20)  # 200 MiB, still referenced (a leak from an earlier run)
    reset_peak_memory(cpu)
    leaked = resident_memory(cpu)
    del held
    reset_peak_memory(cpu)
    print(base, leaked, resident_memory(cpu))
""")


@pytest.mark.skipif(platform.system() != "Linux", reason="VmRSS is Linux's")
def test_resident_memory_at_a_run_start_shows_what_earlier_runs_left():
    out = subprocess.run([sys.executable, "-c", RESIDENT_PROBE], capture_output=True, text=True, check=True)
    base, leaked, freed = (int(x) for x in out.stdout.split())
    assert leaked - base > 150 * 2**20
    assert leaked - freed > 150 * 2**20  # freed and trimmed: no longer resident
