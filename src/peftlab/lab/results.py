"""What a run measures about itself for its result record (:mod:`peftlab.lab.result_record`, where the schema is):
package versions, the machine, the git commit, peak memory, parameter counts and the estimated training FLOPs."""

from __future__ import annotations

import gc
import os
import platform
import resource
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from peftlab.training.host_memory import trim_heap


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in ("peftlab", "torch", "transformers", "safetensors", "rouge-score", "sacrebleu", "peft", "gguf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def git_commit() -> str | None:
    """The commit of the source tree peftlab runs from (None outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window, so that a run's peak is its own when several share a process (``compare``).

    CUDA: the allocator's peak counter. CPU on Linux: the kernel's resident high-water mark (``VmHWM``, reset by
    writing 5 to ``/proc/self/clear_refs``), after a garbage collection and ``malloc_trim`` so that memory the
    previous run freed does not count. Returns False where the CPU mark cannot be reset (the peak is then the
    process's lifetime peak).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    gc.collect()
    trim_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _proc_status_bytes(key: str) -> int | None:
    """A memory line of this process's ``/proc/self/status`` (``VmHWM``: the resident high-water mark, ``VmRSS``:
    resident now) in bytes, or None elsewhere."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    return None


def resident_memory(device: torch.device) -> int | None:
    """Memory this process holds now: CUDA allocated on a GPU, the resident set on CPU (None where unknown). At
    the start of a run, after :func:`reset_peak_memory`, it is what earlier runs in the same process left behind."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return _proc_status_bytes("VmRSS")


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory in bytes since :func:`reset_peak_memory`: CUDA max allocated on a GPU, the peak RSS on CPU."""
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_kind": "cuda_max_allocated"}
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return {"peak_memory_bytes": hwm, "peak_memory_kind": "cpu_peak_rss"}
    # ru_maxrss (never reset) is in kilobytes on Linux and bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024
    return {"peak_memory_bytes": int(rss * scale), "peak_memory_kind": "cpu_peak_rss"}


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding/head counts once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def estimate_training_flops(body_params: int, head_params: int, trainable_params: int, trunk_tokens: int,
                            target_tokens: int, frozen_trunk: bool = False, head_trains: bool = False,
                            frozen_body_params: int = 0, input_tokens: int | None = None) -> int:
    """Estimated training FLOPs of what ran (Kaplan et al. 2020 counting, adapted to what peftlab computes).

    The decoder body (all matmul weights of the blocks; the embedding lookup is free) has a frozen bottom part of
    ``frozen_body_params`` (the blocks below the first trained one; all of it with ``frozen_trunk``) and the part
    above. Per token that runs the frozen part (``trunk_tokens``: every input token, less those whose states the
    frozen-trunk cache served from memory) it costs 2 x frozen forward and nothing backward. Per input token
    (``input_tokens``, default ``trunk_tokens``) the part above costs 2 x its weights forward, 2 x its weights for
    activation gradients and 2 x the trainable body weights for weight gradients. The output head runs only on
    target positions (target-only loss): 2 x head forward, 2 x head for the activation gradient when something below
    it trains, and 2 x head for its weight gradient when it trains. Attention-score FLOPs are left out (small at the
    sequence lengths used here).
    """
    head_weight_trainable = head_params if head_trains else 0
    body_trainable = max(0, min(trainable_params - head_weight_trainable, body_params))
    frozen = body_params if frozen_trunk else min(frozen_body_params, body_params)
    above = body_params - frozen
    input_tokens = trunk_tokens if input_tokens is None else input_tokens
    per_input_token = 4 * above + 2 * body_trainable
    per_target = 2 * head_params * (1 + (not frozen_trunk) + head_trains)
    return int(trunk_tokens * 2 * frozen + input_tokens * per_input_token + target_tokens * per_target)
