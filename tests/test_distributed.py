"""Multi-process training (2 CPU processes, gloo) reproduces the single-process run with the same global batch.

One ``torchrun --nproc_per_node=2`` launch of this file (see ``_driver`` at the bottom) runs every two-process
scenario, because starting Python + torch + transformers twice per scenario would cost far more than the training:

* first-step gradients of LoRA (replicated, one all-reduce) and of full fine-tuning (FSDP-sharded blocks), compared
  with one process at 1e-6: this is the check that catches a wrong normalisation or reduction, which Adam's
  scale-invariance would hide in the trained weights;
* ``peftlab train`` through the real CLI with LoRA: loss curve (metrics.jsonl), adapter, rank-0-only files;
* LoRA interrupted at step 2 on two processes, then resumed in ONE process (checkpoints do not depend on the world
  size);
* full fine-tuning (FSDP) interrupted at step 2 and resumed on two processes (gathered checkpoints re-sharded).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_llama
from safetensors.torch import load_file

from peftlab.config import ConfigError, TrainConfig, load_config
from peftlab.data.encode import IGNORE_INDEX, EncodedExample
from peftlab.lab.experiment import train_run
from peftlab.methods import get_method
from peftlab.training import distributed as D
from peftlab.training.trainer import Interrupt, Trainer

# batch_size=3 over 2 ranks gives uneven shares (2 + 1), and 22 examples leave a 1-row batch in the epoch, where
# rank 1 has no rows and runs the zero-weight dummy. save_every=1 makes a checkpoint at the interrupt.
COMMON = ["task=table-to-text", "data=demo", "data.max_train=22", "data.max_validation=5", "data.max_test=2",
          "eval.max_new_tokens=3", "train.max_steps=4", "train.batch_size=3", "train.grad_accum=2",
          "train.eval_every=2", "train.log_every=1", "train.save_every=1", "eval.show_examples=1", "train.device=cpu"]
RUNS = {"lora": ["method=lora", "method.dropout=0", "train.lr=0.05", "train.eval_examples=2"],
        "full": ["method=full", "train.lr=0.002", "train.eval_examples=0"]}
GRAD_METHODS = {"lora": {"r": 4, "dropout": 0.0, "target_modules": ["q", "v"]}, "full": {}}


# ---- helpers shared by the test process and the torchrun driver ------------------------------------------------
def _toy_data(n: int = 4) -> list[EncodedExample]:
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(n):
        prompt = torch.randint(2, VOCAB, (4 + 2 * i,), generator=g).tolist()
        target = [(t * 7 + 3) % (VOCAB - 2) + 2 for t in prompt[:3 + i]] + [1]
        data.append(EncodedExample(input_ids=prompt + target, labels=[IGNORE_INDEX] * len(prompt) + target))
    return data


def first_step_grads(method: str, out: Path, dist: D.DistContext | None = None) -> dict[str, torch.Tensor]:
    """Whole-tensor gradients of the first optimizer step (4 examples: micro-batches of 3 and 1 rows)."""
    spec = get_method(method)
    trained = spec.apply(tiny_llama(), spec.build_config(GRAD_METHODS[method]))
    cfg = TrainConfig(batch_size=3, grad_accum=2, max_steps=1, max_grad_norm=None, length_bucketing=False,
                      eval_every=0, seed=0)
    trainer = Trainer(trained, _toy_data(), [], cfg, out, pad_id=1, lr=1e-3, dist=dist)
    grads: dict[str, torch.Tensor] = {}

    def capture(*_) -> None:  # before the update; gathering shards is a collective that every rank runs
        grads.update({k: D.full_tensor(p.grad).clone() for k, p in trainer.params.items() if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(capture)
    trainer.fit()
    return grads


def _train_losses(run: Path) -> list[tuple[int, str, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], r["loss"]) for r in records if "loss" in r]


def _assert_same_run(run: Path, reference: Path, weight_atol: float) -> None:
    """Same loss curve (train and validation) and the same saved adapter, within float tolerance."""
    got, want = _train_losses(run), _train_losses(reference)
    assert [(s, split) for s, split, _ in got] == [(s, split) for s, split, _ in want]  # one writer: no duplicates
    assert [loss for *_, loss in got] == pytest.approx([loss for *_, loss in want], rel=1e-4)
    a, b = (load_file(p / "adapter" / "adapter.safetensors") for p in (run, reference))
    assert sorted(a) == sorted(b)
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=weight_atol, msg=name)


# ---- the test -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_process_runs(tiny_llama_dir, tmp_path_factory):
    """Launch the driver once under torchrun (2 gloo processes); returns its output folder."""
    root = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(tiny_llama_dir), str(root)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return root


def test_first_step_gradients_equal_single_process(two_process_runs, tmp_path):
    for method in GRAD_METHODS:
        got = torch.load(two_process_runs / f"grads-{method}.pt", weights_only=True)
        want = first_step_grads(method, tmp_path / method)
        assert sorted(got) == sorted(want) and len(want) > 0
        for name, grad in want.items():
            assert grad.abs().max() > 0 or "lora_A" in name, name  # LoRA A has no gradient while B = 0
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=f"{method}: {name}")


# Adam divides each update by sqrt(v) + 1e-8, so a weight whose gradient is ~1e-8 turns the ~1e-7 relative noise of
# a different summation order into ~1e-4 of its step; 4 steps at lr 0.05 then differ by up to ~2e-5 (seen: 1e-5)
# while the weights moved by ~0.2. Full fine-tuning (lr 0.002, steps of up to 2e-3) differed by up to 7.5e-6 on
# transformers 5.24 (within 5e-6 on 5.23): 0.4% of one step, so its bound is 1% of one step. Gradients are compared
# at 1e-6 above, where no optimizer amplifies anything.
@pytest.mark.parametrize("method, weight_atol", [("lora", 5e-5), ("full", 2e-5)])
def test_two_processes_train_what_one_process_trains(two_process_runs, tiny_llama_dir, tmp_path, method,
                                                     weight_atol):
    single = tmp_path / "single"
    train_run(load_config(None, [f"model={tiny_llama_dir}", *COMMON, *RUNS[method], f"out={single}"]))
    run = two_process_runs / ("lora" if method == "lora" else "full-cut")  # full: interrupted and resumed on 2
    _assert_same_run(run, single, weight_atol)
    result = json.loads((run / "result.json").read_text())
    assert result["train_info"]["world_size"] == 2 and result["train_info"]["steps"] == 4
    moved = load_file(single / "adapter" / "adapter.safetensors")
    assert max(float(v.abs().max()) for k, v in moved.items() if "lora_B" in k or method == "full") > 10 * weight_atol

    if method == "lora":  # a 2-process checkpoint resumed by ONE process ends where the 1-process run ends
        cut = two_process_runs / "lora-cut"
        assert json.loads((cut / "checkpoints" / "step-0000002" / "state.json").read_text())["world_size"] == 2
        train_run(load_config(None, [f"model={tiny_llama_dir}", *COMMON, *RUNS["lora"], f"out={cut}",
                                     "resume=true"]))
        _assert_same_run(cut, single, weight_atol)


def test_shares_cover_each_batch_once_in_order():
    for n in range(0, 9):
        shares = [D.DistContext(rank=r, world_size=3).shard(list(range(n))) for r in range(3)]
        assert sum(shares, []) == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_launch_env_and_device_errors(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert D.launch_env() is None and D.is_main()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert D.launch_env() == D.LaunchEnv(rank=1, world_size=2, local_rank=1) and not D.is_main()
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="inconsistent RANK=2, WORLD_SIZE=2"):
        D.launch_env()
    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match="would put all 2 ranks on one GPU"):
            D.rank_device("cuda:0", 0, 2)
    else:
        with pytest.raises(ConfigError, match="no CUDA device"):
            D.rank_device("cuda", 1, 2)
    assert D.rank_device("cpu", 1, 2) == torch.device("cpu")
    with pytest.raises(ConfigError, match="'gpu' is not a device"):
        D.rank_device("gpu")


# ---- the two-process side (run by torchrun, not by pytest) ---------------------------------------------------
def _driver(model_dir: str, root: str) -> None:
    from peftlab.cli import main

    ctx = D.init_distributed("cpu")
    assert ctx.world_size == 2, "run under torchrun --nproc_per_node=2"
    out = Path(root)
    for method in GRAD_METHODS:
        grads = first_step_grads(method, out / f"grads-{method}-run", ctx)
        if ctx.is_main:
            torch.save(grads, out / f"grads-{method}.pt")
    base = [f"model={model_dir}", *COMMON]
    assert main(["train", *base, *RUNS["lora"], f"out={out / 'lora'}"]) == 0

    def crash(state) -> None:
        if state.step == 2:
            raise Interrupt

    for name, method in (("lora-cut", "lora"), ("full-cut", "full")):
        with pytest.raises(Interrupt):
            train_run(load_config(None, [*base, *RUNS[method], f"out={out / name}"]), on_step=crash)
    train_run(load_config(None, [*base, *RUNS["full"], f"out={out / 'full-cut'}", "resume=true"]))


if __name__ == "__main__":
    _driver(*sys.argv[1:])
