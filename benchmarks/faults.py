"""Fault injection against real SmolLM2-135M runs (issue 10): each fault is caused for real in a subprocess running
``peftlab``, then what it left is checked. Prints one table row per fault: trials, passed, what was checked.

Faults:
  train kill -9      SIGKILL at random moments of ``peftlab train`` (half of them aimed into a checkpoint write by
                     polling for the ``.step-*.tmp`` folder), then the same command with ``resume=true``: the final
                     adapter must be byte-identical to an uninterrupted reference run and ``metrics.jsonl`` must hold
                     the reference's records (every field but time and tokens/s), once each.
  compare/export/merge/report kill -9
                     SIGKILL at a random moment (half aimed into the output write), then the same command again: it
                     completes, outputs equal the reference's, and nothing half-written was ever visible.
  non-finite         the loss of step 3 made NaN (patched in the child; real NaNs are not reproducible on demand):
                     the run stops naming step 3 and checkpoint step 2, which loads and resumes to the reference
                     adapter; with train.skip_nonfinite=true the run finishes and counts 1 skipped step.
  disk full / read-only
                     the run folder on a real 64 MiB tmpfs (``mount -t tmpfs``, needs root), filled up with a file or
                     remounted read-only after checkpoint 2: a one-line error naming the path, the last checkpoint
                     loads, and after freeing / remounting, resume ends at the reference adapter.
  two processes      a second ``train``/``compare`` on the same folder is refused at once (naming the PID); after
                     ``kill -9`` of the first, the lock it left does not block the rerun.
  out of memory      the child's address space capped (RLIMIT_AS, set when training starts) and a big batch: the
                     error names the batch size and sequence length and what to lower.

Usage:
    python benchmarks/faults.py [--work /tmp/peftlab-faults] [--train-trials 20] [--trials 3] [--seed 0]
        [--only train,compare,export,merge,report,nonfinite,disk,lock,oom]

Rows already measured in ``--work`` (``rows.json``) are reused, so a run that was stopped picks up where it was.

This is not a timing benchmark: the machine may be shared, and the kill moments are drawn over each command's
measured duration, so only pass counts matter. ``python benchmarks/faults.py child MODE -- ARGS`` is the patched
child entry point used for the non-finite and OOM rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "e2e_nlg"
STEPS = 6
TRAIN = ["configs/e2e_lora.yaml", f"data.path={DATA}", f"train.max_steps={STEPS}", "train.batch_size=2",
         "train.save_every=1", "train.log_every=1", "train.eval_every=3", "train.patience=0", "train.warmup_ratio=0",
         "data.max_train=12", "data.max_validation=2", "data.max_test=1", "eval.max_new_tokens=4",
         "task.max_source_tokens=48", "task.max_target_tokens=24", "train.device=cpu"]
VOLATILE = ("time", "tokens_per_s")  # metrics.jsonl fields that differ between identical runs
# One intra-op thread per child: on a shared 2-core machine more threads thrash, and every run (reference and
# trials) must use the same count for byte-identical results.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Row:
    """One line of the table."""

    fault: str
    trials: int
    passed: int
    checked: str
    notes: str = ""


# ------------------------------------------------------------------------------------------------ processes


def peftlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "peftlab.cli", *args]


def child(mode: str, *args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "child", mode, "--", *args]


def train_cmd(out: Path, *extra: str) -> list[str]:
    return peftlab("train", *TRAIN, f"out={out}", *extra)


def run(cmd: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)


def spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=ENV)


def kill_when(proc: subprocess.Popen, at: float | None = None, watch: Callable[[], bool] | None = None) -> bool:
    """SIGKILL ``proc`` ``at`` seconds after now, or as soon as ``watch()`` is true; False if it exited first."""
    t0 = time.monotonic()
    while proc.poll() is None:
        if (at is not None and time.monotonic() - t0 >= at) or (watch is not None and watch()):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.0002 if watch is not None else 0.01)
    return False


def leftovers(folder: Path) -> list[str]:
    """Temporary names (``.x.*.tmp``) under ``folder``: the trace of a write interrupted before its rename."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if ".tmp" in p.name)


def tmp_appears(folder: Path, prefix: str) -> Callable[[], bool]:
    """A watch: a ``.<prefix>...tmp`` temp file/folder exists in ``folder`` (a write is under way)."""
    def seen() -> bool:
        try:
            return any(n.startswith(f".{prefix}") and ".tmp" in n for n in os.listdir(folder))
        except FileNotFoundError:
            return False
    return seen


# ------------------------------------------------------------------------------------------------ checks


def metric_records(out: Path) -> list[dict[str, Any]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in lines if line.strip()]


def same_run(out: Path, ref: Path) -> str:
    """'' when ``out`` finished with ``ref``'s adapter bytes and metrics records, else what differs."""
    if not (out / "result.json").exists():
        return "no result.json"
    if (out / "adapter/adapter.safetensors").read_bytes() != (ref / "adapter/adapter.safetensors").read_bytes():
        return "adapter differs"
    got, want = metric_records(out), metric_records(ref)
    if got != want:
        keys = [(r.get("split"), r.get("step"), r.get("event")) for r in got]
        return f"metrics differ ({len(got)} vs {len(want)} records; dupes={len(keys) - len(set(keys))})"
    if leftovers(out / "checkpoints"):
        return f"temp leftovers {leftovers(out / 'checkpoints')}"
    return ""


def one_line_error(proc: subprocess.CompletedProcess | str, *needles: str) -> str:
    """'' when stderr's last line is ``peftlab: error: ...`` containing every needle."""
    text = proc if isinstance(proc, str) else proc.stderr
    last = text.strip().splitlines()[-1] if text.strip() else ""
    if not last.startswith("peftlab: error:"):
        return f"no one-line error (last line: {last[:200]!r})"
    missing = [n for n in needles if n not in last]
    return f"error lacks {missing}: {last[:300]}" if missing else ""


def checkpoint_loads(out: Path) -> str:
    from peftlab.training.checkpoint import latest_checkpoint, load_checkpoint

    folder = latest_checkpoint(out)
    if folder is None:
        return "no checkpoint"
    try:
        load_checkpoint(folder)
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return f"{folder.name} does not load: {exc}"
    return ""


# ------------------------------------------------------------------------------------------------ rows


def timed_reference(work: Path, name: str, cmd: list[str]) -> float:
    """Run the uninterrupted reference ``work/<name>`` once (reused by later invocations); its duration in seconds,
    over which kill moments are drawn."""
    stamp = work / f"{name}.seconds"
    if stamp.exists():
        return float(stamp.read_text())
    shutil.rmtree(work / name, ignore_errors=True)
    t0 = time.monotonic()
    proc = run(cmd)
    if proc.returncode:
        sys.exit(f"reference {name} failed:\n{proc.stderr[-3000:]}")
    seconds = time.monotonic() - t0
    stamp.write_text(f"{seconds:.2f}\n")
    return seconds


def train_kills(work: Path, ref: Path, seconds: float, trials: int, rng: random.Random) -> Row:
    passed, in_ckpt, in_other, fails = 0, 0, 0, []
    for k in range(trials):
        out = work / f"train-kill-{k}"
        shutil.rmtree(out, ignore_errors=True)
        proc = spawn(train_cmd(out), out.parent / f"train-kill-{k}.log")
        if k % 2:  # aimed: the first sign of checkpoint N's temporary folder
            kill_when(proc, watch=tmp_appears(out / "checkpoints", f"step-{rng.randint(1, STEPS):07d}"))
        else:
            kill_when(proc, at=rng.uniform(0.5, seconds))
        left = leftovers(out) if out.exists() else []
        in_ckpt += any(".step-" in name for name in left)
        in_other += bool(left) and not any(".step-" in name for name in left)
        resumed = run(train_cmd(out, "resume=true"))
        problem = f"rc={resumed.returncode} {resumed.stderr[-300:]}" if resumed.returncode else same_run(out, ref)
        passed += not problem
        fails += [f"trial {k}: {problem}"] if problem else []
        print(f"  train kill {k}: {'ok' if not problem else problem} (temp names at the kill: {left})", flush=True)
    return Row("kill -9 during train, then resume=true", trials, passed,
               "adapter bytes == uninterrupted run; metrics.jsonl records == reference (no dupes/gaps); "
               "no temp leftovers", f"{in_ckpt} kills inside a checkpoint write, {in_other} inside another write"
               + ("; " + "; ".join(fails) if fails else ""))


GRID = """name: g
task: {{name: table-to-text, max_source_tokens: 48, max_target_tokens: 24}}
data: {{path: {data}, max_validation: 2, max_test: 1}}
train: {{max_steps: 4, batch_size: 2, save_every: 1, log_every: 1, device: cpu, warmup_ratio: 0}}
eval: {{max_new_tokens: 4}}
methods: [{{name: lora, options: {{r: 8, target_modules: [q, v]}}}}, ia3]
n_train: [8]
seeds: [0]
baselines: false
"""


def compare_outputs(results: Path, ref: Path) -> str:
    """'' when ``results`` holds the reference grid's result files and identical adapters."""
    files = sorted(p.name for p in (results / "g").glob("*.json"))
    if files != sorted(p.name for p in (ref / "g").glob("*.json")):
        return f"result files {files}"
    from peftlab.lab.result_record import read_result

    for name in files:
        if read_result(results / "g" / name).grid is None:
            return f"{name} has no grid record"
    for adapter in (ref / "g" / "runs").glob("*/adapter/adapter.safetensors"):
        mine = results / adapter.relative_to(ref)
        if not mine.exists() or mine.read_bytes() != adapter.read_bytes():
            return f"adapter {adapter.relative_to(ref)} differs"
    return ""


def compare_reference(work: Path) -> tuple[Path, float]:
    """The uninterrupted grid (its results also feed the report row) and its duration."""
    ref = work / "compare-ref"
    return ref, timed_reference(work, ref.name, peftlab("compare", str(work / "grid.yaml"), f"results={ref}"))


def compare_kills(work: Path, trials: int, rng: random.Random) -> Row:
    ref, seconds = compare_reference(work)
    grid = work / "grid.yaml"
    passed, fails = 0, []
    for k in range(trials):
        results = work / f"compare-kill-{k}"
        shutil.rmtree(results, ignore_errors=True)
        cmd = peftlab("compare", str(grid), f"results={results}")
        proc = spawn(cmd, work / f"compare-kill-{k}.log")
        if k % 2:
            target = results / "g" / "runs" / "ia3--default--n8--seed0" / "checkpoints"
            kill_when(proc, watch=tmp_appears(target, f"step-{rng.randint(1, 4):07d}"))
        else:
            kill_when(proc, at=rng.uniform(0.5, seconds))
        again = run(cmd)
        problem = f"rc={again.returncode} {again.stderr[-300:]}" if again.returncode else compare_outputs(results, ref)
        passed += not problem
        fails += [f"trial {k}: {problem}"] if problem else []
        print(f"  compare kill {k}: {problem or 'ok'}", flush=True)
    return Row("kill -9 during compare, then rerun", trials, passed,
               "rerun exits 0; result files (with grid record) and adapters == uninterrupted grid", "; ".join(fails))


def folder_kills(work: Path, name: str, cmd_of: Callable[[Path], list[str]], check: Callable[[Path], str],
                 trials: int, rng: random.Random) -> Row:
    """kill -9 of a command writing folder OUT (export, merge), then the same command again."""
    seconds = timed_reference(work, f"{name}-ref", cmd_of(work / f"{name}-ref"))
    passed, fails, finished_first, in_write = 0, [], 0, 0
    for k in range(trials):
        out = work / f"{name}-kill-{k}"
        shutil.rmtree(out, ignore_errors=True)
        p = spawn(cmd_of(out), work / f"{name}-kill-{k}.log")
        watch = tmp_appears(work, out.name)
        if k % 2:
            kill_when(p, watch=watch)
        else:
            kill_when(p, at=rng.uniform(0.3, seconds))
        in_write += watch()
        if out.exists():  # the rename happened before the kill: OUT must be complete, never half-written
            finished_first += 1
            problem = check(out)
        else:
            again = run(cmd_of(out))
            problem = f"rc={again.returncode} {again.stderr[-300:]}" if again.returncode else check(out)
        passed += not problem
        fails += [f"trial {k}: {problem}"] if problem else []
        print(f"  {name} kill {k}: {problem or 'ok'}", flush=True)
    return Row(f"kill -9 during {name}, then rerun", trials, passed,
               "after the kill OUT is absent or complete; the rerun exits 0; outputs == uninterrupted run (tensors + "
               "metadata for .safetensors, bytes otherwise)",
               f"{in_write} kills inside the folder write, {finished_first} after its rename"
               + ("; " + "; ".join(fails) if fails else ""))


def same_files(out: Path, ref: Path, names: list[str]) -> str:
    """'' when each file equals the reference's: bytes, or for .safetensors the tensors and the metadata (its
    header's metadata order varies from write to write: safetensors serialises a hash map)."""
    for name in names:
        if not (out / name).exists():
            return f"{name} missing"
        if name.endswith(".safetensors"):
            same = _tensors_and_metadata(out / name) == _tensors_and_metadata(ref / name)
        else:
            same = (out / name).read_bytes() == (ref / name).read_bytes()
        if not same:
            return f"{name} differs from the uninterrupted run's"
    return ""


def _tensors_and_metadata(path: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    import torch
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:  # raw bytes: bfloat16 has no numpy type
        tensors = {k: f.get_tensor(k).reshape(-1).view(torch.uint8).numpy().tobytes() for k in f.keys()}
        return tensors, dict(f.metadata() or {})


def report_kills(work: Path, results: Path, trials: int, rng: random.Random) -> Row:
    def cmd_of(out: Path) -> list[str]:
        return peftlab("report", str(results), "--out", str(out))

    ref = work / "report-ref"
    seconds = timed_reference(work, ref.name, cmd_of(ref))
    passed, fails, in_write = 0, [], 0
    for k in range(trials):
        out = work / f"report-kill-{k}"
        shutil.rmtree(out, ignore_errors=True)
        p = spawn(cmd_of(out), work / f"report-kill-{k}.log")
        if k % 2:
            kill_when(p, watch=tmp_appears(out, "report"))
        else:
            kill_when(p, at=rng.uniform(0.2, seconds))
        in_write += bool(leftovers(out)) if out.exists() else 0
        html = out / "report.html"
        problem = "" if not html.exists() or html.read_text().rstrip().endswith("</html>") else "half-written html"
        again = run(cmd_of(out))
        problem = problem or (f"rc={again.returncode}" if again.returncode else
                              same_files(out, ref, ["report.html"]))
        passed += not problem
        fails += [f"trial {k}: {problem}"] if problem else []
        print(f"  report kill {k}: {problem or 'ok'}", flush=True)
    return Row("kill -9 during report, then rerun", trials, passed,
               "report.html, if present after the kill, is complete; the rerun exits 0 and equals the reference",
               f"{in_write} kills inside a write" + ("; " + "; ".join(fails) if fails else ""))


def nonfinite(work: Path, ref: Path) -> Row:
    out, fails = work / "nonfinite", []
    shutil.rmtree(out, ignore_errors=True)
    proc = run(child("nan-at-3", "train", *TRAIN, f"out={out}"))
    problem = one_line_error(proc, "step 3", "step-0000002", "intact")
    problem = problem or checkpoint_loads(out)
    if not problem:
        resumed = run(train_cmd(out, "resume=true"))
        problem = f"resume rc={resumed.returncode}" if resumed.returncode else same_run(out, ref)
    fails += [f"stop: {problem}"] if problem else []
    skip = work / "nonfinite-skip"
    shutil.rmtree(skip, ignore_errors=True)
    proc = run(child("nan-at-3", "train", *TRAIN, f"out={skip}", "train.skip_nonfinite=true"))
    if proc.returncode:
        fails.append(f"skip: rc={proc.returncode} {proc.stderr[-300:]}")
    else:
        from peftlab.lab.result_record import RESULT_NAME, read_result

        skipped = read_result(skip / RESULT_NAME).train_info.skipped_nonfinite_steps
        events = [r for r in metric_records(skip) if r.get("event") == "skipped_nonfinite"]
        if skipped != 1 or [r["step"] for r in events] != [3]:
            fails.append(f"skip: skipped_nonfinite_steps={skipped}, events={events}")
    return Row("NaN loss at step 3 (patched in)", 2, 2 - len(fails),
               "stops with a one-line error naming step 3 and checkpoint step-0000002, which loads, and resume gives "
               "the reference adapter; with train.skip_nonfinite=true the run ends and counts 1 skipped step",
               "; ".join(fails))


def _tmpfs(mount: Path, size: str) -> str:
    mount.mkdir(parents=True, exist_ok=True)
    subprocess.run(["umount", str(mount)], capture_output=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    return proc.stderr.strip() if proc.returncode else ""


def _wait_for_checkpoint(out: Path, step: int, proc: subprocess.Popen) -> None:
    latest = out / "checkpoints" / "LATEST"
    while proc.poll() is None and not (latest.exists() and latest.read_text().strip() >= f"step-{step:07d}"):
        time.sleep(0.005)


def storage_fault(work: Path, ref: Path, kind: str) -> str:
    """'' when filling the disk / remounting read-only under a run gives a clean error and a resumable run."""
    # Read-only: only checkpoints/ is its own tmpfs, because a file system with a file open for writing (the run's
    # lock) cannot be remounted read-only; the checkpoint writes then meet EROFS as on a read-only disk.
    out = work / f"{kind}-run"
    shutil.rmtree(out, ignore_errors=True)
    mount = work / f"mnt-{kind}" if kind == "full" else out / "checkpoints"
    problem = _tmpfs(mount, "64m")
    if problem:
        return f"cannot mount a tmpfs ({problem})"
    try:
        out = mount / "run" if kind == "full" else out
        log = work / f"{kind}.log"
        proc = spawn(train_cmd(out), log)
        _wait_for_checkpoint(out, 2, proc)
        if kind == "full":
            subprocess.run(["dd", "if=/dev/zero", f"of={mount}/filler", "bs=1M"], capture_output=True)
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        proc.wait()
        reason = "No space left on device" if kind == "full" else "Read-only file system"
        problem = one_line_error(log.read_text(), reason, "intact") or checkpoint_loads(out)
        if kind == "full":
            (mount / "filler").unlink()
        else:
            subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)
        if not problem:
            resumed = run(train_cmd(out, "resume=true"))
            problem = f"resume rc={resumed.returncode}" if resumed.returncode else same_run(out, ref)
        return problem
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def storage_rows(work: Path, ref: Path) -> list[Row]:
    what = ("one-line error naming the path, '{}' and the intact checkpoint, which loads; after freeing/remounting, "
            "resume=true gives the reference adapter and metrics")
    if os.geteuid() != 0:
        return [Row("disk full / read-only (tmpfs)", 0, 0, what.format("..."), "skipped: mounting needs root")]
    full = storage_fault(work, ref, "full")
    ro = storage_fault(work, ref, "ro")
    return [Row("disk full after checkpoint 2 (64 MiB tmpfs, filled)", 1, int(not full),
                what.format("No space left on device"), full),
            Row("checkpoints/ read-only after checkpoint 2 (tmpfs remount,ro)", 1, int(not ro),
                what.format("Read-only file system"), ro)]


def _second_refused(first: subprocess.Popen, cmd: list[str], lock: Path) -> tuple[str, float]:
    while first.poll() is None and not (lock.exists() and lock.read_text().strip()):
        time.sleep(0.01)
    t0 = time.monotonic()
    second = run(cmd)
    seconds = time.monotonic() - t0
    print(f"  second process said: {second.stderr.strip().splitlines()[-1] if second.stderr.strip() else ''}")
    return one_line_error(second, "in use by another peftlab process", f"pid {first.pid}"), seconds


def lock_rows(work: Path, ref: Path) -> list[Row]:
    rows = []
    out = work / "lock-train"
    shutil.rmtree(out, ignore_errors=True)
    first = spawn(train_cmd(out), work / "lock-train.log")
    problem, seconds = _second_refused(first, train_cmd(out, "resume=true"), out / ".lock")
    kill_when(first, at=0)
    if not problem:
        again = run(train_cmd(out, "resume=true"))
        problem = f"rerun rc={again.returncode} {again.stderr[-300:]}" if again.returncode else same_run(out, ref)
    rows.append(Row("two `train` on one out; then kill -9 the first", 1, int(not problem),
                    "the second is refused naming the first's PID; after kill -9 of the first its stale lock does "
                    "not block: resume=true completes with the reference adapter",
                    problem or f"refused after {seconds:.1f}s (interpreter start + imports)"))
    grid, results = work / "grid.yaml", work / "lock-compare"
    shutil.rmtree(results, ignore_errors=True)
    cmd = peftlab("compare", str(grid), f"results={results}")
    first = spawn(cmd, work / "lock-compare.log")
    problem, seconds = _second_refused(first, cmd, results / "g" / ".lock")
    kill_when(first, at=0)
    if not problem:
        again = run(cmd)
        problem = f"rerun rc={again.returncode} {again.stderr[-300:]}" if again.returncode else ""
    rows.append(Row("two `compare` on one results folder; then kill -9 the first", 1, int(not problem),
                    "the second is refused naming the first's PID; the rerun after kill -9 completes",
                    problem or f"refused after {seconds:.1f}s"))
    return rows


def oom(work: Path) -> Row:
    out = work / "oom"
    shutil.rmtree(out, ignore_errors=True)
    big = [a for a in TRAIN if not a.startswith(("train.batch_size", "task.max_source_tokens", "data.max_train"))]
    proc = run(child("rlimit-as", "train", *big, "train.batch_size=16", "task.max_source_tokens=512",
                     "data.max_train=16", f"out={out}"))
    problem = one_line_error(proc, "out of memory", "train.batch_size=16", "tokens", "train.gradient_checkpointing")
    said = proc.stderr.strip().splitlines()[-1][:400] if proc.stderr.strip() else ""
    return Row("out of memory on a batch (RLIMIT_AS +512 MiB, batch 16)", 1, int(not problem),
               "one-line error naming the batch size, sequence length and what to lower", problem or f"`{said}`")


# ------------------------------------------------------------------------------------------------ child + main


def run_child(mode: str, argv: list[str]) -> int:
    """``peftlab`` with a fault patched in: ``nan-at-3`` (step 3's loss is NaN) or ``rlimit-as`` (address space
    capped at 512 MiB over what the process maps when training starts)."""
    from peftlab.cli import main
    from peftlab.training import trainer

    if mode == "nan-at-3":
        original = trainer.Trainer._forward_loss

        def forward_loss(self, batch, rows=None):  # noqa: ANN001, ANN202 - same signature as patched
            loss, n = original(self, batch, rows)
            return (loss * float("nan"), n) if self.model.training and self.state.step == 2 else (loss, n)

        trainer.Trainer._forward_loss = forward_loss
    elif mode == "rlimit-as":
        import resource

        fit = trainer.Trainer.fit

        def capped_fit(self):  # noqa: ANN001, ANN202
            mapped = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1])
            limit = mapped * 1024 + 512 * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
            return fit(self)

        trainer.Trainer.fit = capped_fit
    return main(argv)


def table(rows: list[Row]) -> str:
    lines = ["| fault | trials | passed | checked | notes |", "|---|---|---|---|---|"]
    lines += [f"| {r.fault} | {r.trials} | {r.passed}/{r.trials} | {r.checked} | {r.notes or '-'} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "child":
        sys.exit(run_child(sys.argv[2], sys.argv[sys.argv.index("--") + 1:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/peftlab-faults", help="scratch folder (reference runs are reused)")
    parser.add_argument("--train-trials", type=int, default=20)
    parser.add_argument("--trials", type=int, default=3, help="trials of each other kill -9 row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="train,compare,export,merge,report,nonfinite,disk,lock,oom")
    args = parser.parse_args()
    only, rng, work = set(args.only.split(",")), random.Random(args.seed), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    (work / "grid.yaml").write_text(GRID.format(data=DATA))
    ref = work / "ref"
    seconds = timed_reference(work, ref.name, train_cmd(ref))
    print(f"reference run: {seconds:.0f}s", flush=True)
    rows = rows_for(only, work, ref, seconds, args, rng)
    print(f"\n{table(rows)}\n\ntotal {time.monotonic() - t0:.0f}s; command: python benchmarks/faults.py "
          + " ".join(sys.argv[1:]))


def rows_for(only: set[str], work: Path, ref: Path, seconds: float, args: argparse.Namespace,
             rng: random.Random) -> list[Row]:
    """Every row asked for; a fault group measured by an earlier invocation with the same --work is reused from
    ``rows.json`` (delete it, or the group's entry, to measure again), so an interrupted session resumes."""
    adapter = str(ref / "adapter")
    export_files = ["adapter_model.safetensors", "adapter_config.json"]
    merge_files = ["model.safetensors", "config.json"]
    groups: dict[str, Callable[[], list[Row]]] = {
        "train": lambda: [train_kills(work, ref, seconds, args.train_trials, rng)],
        "compare": lambda: [compare_kills(work, args.trials, rng)],
        "export": lambda: [folder_kills(work, "export", lambda o: peftlab("export", "--adapter", adapter, str(o)),
                                        lambda o: same_files(o, work / "export-ref", export_files), args.trials, rng)],
        "merge": lambda: [folder_kills(work, "merge",
                                       lambda o: peftlab("merge", "--adapter", adapter, str(o), "--dtype", "bfloat16"),
                                       lambda o: same_files(o, work / "merge-ref", merge_files), args.trials, rng)],
        "report": lambda: [report_kills(work, compare_reference(work)[0], args.trials, rng)],
        "nonfinite": lambda: [nonfinite(work, ref)],
        "disk": lambda: storage_rows(work, ref),
        "lock": lambda: lock_rows(work, ref),
        "oom": lambda: [oom(work)],
    }
    saved_path = work / "rows.json"
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
    for name, measure in groups.items():
        if name in only and name not in saved:
            print(f"[{name}]", flush=True)
            saved[name] = [dataclasses.asdict(row) for row in measure()]
            saved_path.write_text(json.dumps(saved, indent=1))
    return [Row(**row) for name in groups if name in only for row in saved.get(name, [])]

if __name__ == "__main__":
    main()
