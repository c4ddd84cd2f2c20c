"""Data-parallel training over several processes (one per CPU process group member or GPU).

Launch ``peftlab train`` under any launcher that sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (plus
``MASTER_ADDR``/``MASTER_PORT``); nothing else changes in the command::

    torchrun --nproc_per_node=2 -m peftlab.cli train configs/x.yaml train.device=cpu    # 2 CPU processes (gloo)
    torchrun --nproc_per_node=4 -m peftlab.cli train configs/x.yaml                     # 4 GPUs (nccl)
    accelerate launch --multi_gpu --num_processes=4 -m peftlab.cli train configs/x.yaml
    accelerate launch --multi_gpu --num_processes=2 -m peftlab.cli train configs/x.yaml train.device=cpu

(``accelerate launch --cpu`` starts ONE process; ``--multi_gpu`` is what starts N processes, through torchrun's
launcher, and with ``train.device=cpu`` they use gloo on the CPU.)

Semantics (what makes an N-process run reproduce a 1-process run):

* ``train.batch_size`` is the GLOBAL micro-batch: each micro-batch of the single-process run is split across the
  ranks (rank r takes a contiguous, near-equal share of its rows), so an optimizer step still sees
  ``batch_size x grad_accum`` examples whatever the world size, and steps, epochs, schedule, logs and checkpoints
  are those of the single-process run. More processes make each step faster and lighter per process; they do not
  change what is trained. (Scale the batch explicitly with ``train.batch_size`` if you want a bigger one.)
* Every rank builds the same ordered batch list from the seed, so no sampler state is exchanged; the loss of each
  rank's share is divided by the GLOBAL target-token count of the optimizer step (known to every rank, because every
  rank knows the whole step's examples), and gradients are SUMMED over ranks. The result is the single-process
  gradient ``sum_ranks sum_tokens nll / N_step_tokens``, up to floating-point summation order.
* Replicated parameters (every adapter method; embeddings/norms/head under FSDP) are synchronised by one bucketed
  ``all_reduce(SUM)`` of their gradients per optimizer step, not by wrapping the model in ``DistributedDataParallel``:
  our loss calls the decoder trunk and the output head separately and methods such as prompt tuning use their
  parameters in ``prepare_inputs``, outside any wrapped ``forward``, where DDP's hooks would not see them. With
  accumulation this is what DDP + ``no_sync`` does (one reduction per step), and for adapters the reduced tensors
  are small.
* Transformer blocks whose parameters ALL train (full fine-tuning, last-blocks) are sharded with FSDP2
  (``torch.distributed.fsdp.fully_shard``; gradients, AdamW state and, between uses, weights live 1/N per rank).
  FSDP runs on CPU with gloo (reductions forced to plain SUM, since gloo lacks PREMUL_SUM) and on GPUs with nccl.
* Rank 0 alone writes ``metrics.jsonl``, checkpoints (sharded tensors are gathered first, into the same
  world-size-independent format a single process writes), the adapter and ``result.json``, and runs the generation
  metrics; the validation loss is computed on shards and all-reduced. A checkpoint can be resumed with any number
  of processes; the output folder must be on a filesystem every rank can read.
"""

from __future__ import annotations

import atexit
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from peftlab.config import ConfigError

# Gradients are all-reduced in buckets of this many elements (64 MB of fp32): bounded extra memory, few calls.
BUCKET_ELEMENTS = 1 << 24
# How long a rank waits in a collective. Ranks > 0 skip the final evaluation; when one process runs several
# trainings (a grid, the demo) they wait at the next run's first collective while rank 0 evaluates, hence hours.
TIMEOUT = timedelta(hours=float(os.environ.get("PEFTLAB_DIST_TIMEOUT_HOURS", "3")))


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher (torchrun, ``accelerate launch``) told this process."""

    rank: int
    world_size: int
    local_rank: int


def launch_env() -> LaunchEnv | None:
    """The ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` environment of a launched process, or None when not launched.

    Raises:
        ConfigError: the variables are present but malformed or inconsistent.
    """
    if "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
        return None
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ConfigError(f"environment: RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc})") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"environment: inconsistent RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return LaunchEnv(rank, world, local)


def is_main() -> bool:
    """True in a single process and on rank 0 of a launched group (the one process that writes files)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    env = launch_env()
    return env is None or env.rank == 0


def rank_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device of this rank for ``train.device`` = ``name``: with several processes ``cuda`` means
    ``cuda:LOCAL_RANK``.

    Raises:
        ConfigError: CUDA asked for but absent, or one ``cuda:N`` pinned for every rank of a multi-process run.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: {name!r} is not a device; choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {name!r} asked for, but no CUDA device is available")
        if device.index is not None and world_size > 1:
            raise ConfigError(f"train.device: {name!r} would put all {world_size} ranks on one GPU; use "
                              f"train.device=cuda or auto (rank r then uses cuda:LOCAL_RANK)")
        if device.index is None and world_size > 1:
            device = torch.device("cuda", local_rank)
    return device


@dataclass
class DistContext:
    """This process's place in the run; the single-process default makes every collective a no-op.

    Attributes:
        rank: global rank (0 writes files).
        world_size: number of processes.
        local_rank: rank on this machine (selects the GPU).
        device: where this rank computes.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shard(self, items: Sequence[int]) -> list[int]:
        """This rank's contiguous share of one global micro-batch: sizes differ by at most one, ranks in order.

        ``n`` items over ``W`` ranks: rank r gets ``n // W`` items, plus one if ``r < n % W``; a rank can get none
        when ``n < W`` (the caller then runs a zero-weight dummy so collective calls stay in step).
        """
        base, extra = divmod(len(items), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return list(items[start:start + base + (self.rank < extra)])

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Sum Python floats over ranks (float64); every rank gets the identical result."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def gather_objects(self, obj: Any) -> list[Any]:
        """``obj`` from every rank, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_parameters(self, params: Sequence[torch.Tensor]) -> None:
        """Copy rank 0's values into every rank's parameters (all ranks start identical, as DDP does)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for bucket in _buckets([p for p in params if not is_sharded(p)]):
                flat = torch.cat([p.detach().reshape(-1).float() for p in bucket])
                dist.broadcast(flat, src=0)
                _unflatten_into(flat, bucket, [p.data for p in bucket])

    def reduce_step(self, params: Sequence[torch.Tensor], local_loss: float) -> float:
        """Sum the replicated parameters' gradients and the step's summed loss over ranks; returns the global loss.

        Sharded (FSDP) parameters are skipped: FSDP reduce-scatters their gradients itself. A parameter without a
        gradient on every rank keeps ``grad=None`` (AdamW then skips it, as in a single process).
        """
        if not self.enabled:
            return local_loss
        replicated = [p for p in params if not is_sharded(p)]
        summed = self.sum_floats([local_loss] + [float(p.grad is not None) for p in replicated])
        with_grad = [p for p, flag in zip(replicated, summed[1:], strict=True) if flag > 0]
        with torch.no_grad():
            for bucket in _buckets(with_grad):
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
                flat = torch.cat([g.reshape(-1).float() for g in grads])
                dist.all_reduce(flat)
                for p, g in zip(bucket, grads, strict=True):
                    p.grad = g
                _unflatten_into(flat, bucket, [p.grad for p in bucket])
        return summed[0]

    def _comm_device(self) -> torch.device:
        # The group's backend follows the device: nccl moves CUDA tensors, gloo CPU tensors.
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def _buckets(params: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        if bucket and size + p.numel() > BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket


def _unflatten_into(flat: torch.Tensor, shapes_from: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> None:
    offset = 0
    for ref, target in zip(shapes_from, targets, strict=True):
        n = ref.numel()
        target.copy_(flat[offset:offset + n].view_as(target))
        offset += n


_OWNED = False  # whether init_distributed created the default group (then teardown destroys it)


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group the launcher described (gloo on CPU, nccl on CUDA), or a single-process context.

    The group is created once per process and kept until exit: a process that runs several trainings reuses it
    (destroying and re-creating the default group while another rank still uses the old one is not safe). A group
    initialised by the caller is reused as it is.

    Args:
        device: ``train.device``; under several processes ``cuda``/``auto`` select ``cuda:LOCAL_RANK``.
    """
    env = launch_env()
    if env is None or env.world_size == 1:
        return DistContext(device=rank_device(device))
    target = rank_device(device, env.local_rank, env.world_size)
    global _OWNED
    if not dist.is_initialized():
        if target.type == "cuda":
            torch.cuda.set_device(target)
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo", timeout=TIMEOUT,
                                device_id=target if target.type == "cuda" else None)
        _OWNED = True
        atexit.register(teardown)
    elif (dist.get_rank(), dist.get_world_size()) != (env.rank, env.world_size):
        raise RuntimeError(f"the initialised process group (rank {dist.get_rank()} of {dist.get_world_size()}) does "
                           f"not match RANK={env.rank}, WORLD_SIZE={env.world_size}")
    return DistContext(env.rank, env.world_size, env.local_rank, target)


def teardown() -> None:
    """Destroy the process group if :func:`init_distributed` created it (registered to run at exit)."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


# ---- FSDP for fully trained blocks ---------------------------------------------------------------------------
def is_sharded(t: torch.Tensor | None) -> bool:
    """True for a ``DTensor`` (an FSDP-sharded parameter, gradient or optimizer state)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_trained_blocks(blocks: Sequence[nn.Module], ctx: DistContext) -> list[nn.Module]:
    """Shard with FSDP2 each block whose parameters all train; returns the sharded blocks (none in one process).

    Each block is its own FSDP unit (the loss calls the trunk and head directly, so a root unit around the whole
    model would never see its forward); embeddings, final norm and head stay replicated. Gradients are reduced as
    a plain SUM (divide factor 1) to match the loss normalised by the global token count.
    """
    if not ctx.enabled:
        return []
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    chosen = [b for b in blocks if any(True for _ in b.parameters()) and all(p.requires_grad for p in b.parameters())]
    if not chosen:
        return []
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for block in chosen:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
        block.set_gradient_divide_factor(1.0)
        block.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM; SUM also suits nccl
    return chosen


def set_gradient_sync(blocks: Sequence[nn.Module], enabled: bool) -> None:
    """Skip (False) or do (True) FSDP's gradient reduce-scatter in the next backward: accumulation without traffic."""
    for block in blocks:
        block.set_requires_gradient_sync(enabled)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded one is all-gathered (a collective: every rank must call this in the same order)."""
    return t.detach().full_tensor() if is_sharded(t) else t.detach()


def like_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor every rank holds) laid out like ``param``: this rank's shard if it is sharded."""
    if not is_sharded(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    local = value.detach().to(param.device_mesh.device_type)
    return distribute_tensor(local, param.device_mesh, param.placements, src_data_rank=None)  # no communication


def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float, ctx: DistContext) -> float:
    """Clip gradients to a global L2 norm across sharded and replicated parameters; returns the norm before clipping.

    ``||g||^2 = sum_ranks ||local shards||^2 + ||replicated||^2`` (replicated gradients are equal on every rank),
    then every gradient is scaled by ``min(1, max_norm / (||g|| + 1e-6))`` like ``clip_grad_norm_``.
    """
    grads = [p.grad for p in params if p.grad is not None]
    sharded = sum(float(g.to_local().float().pow(2).sum()) for g in grads if is_sharded(g))
    replicated = sum(float(g.float().pow(2).sum()) for g in grads if not is_sharded(g))
    total = math.sqrt(ctx.sum_floats([sharded])[0] + replicated)
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        with torch.no_grad():
            for g in grads:
                (g.to_local() if is_sharded(g) else g).mul_(coef)
    return total


def gather_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with sharded state tensors gathered whole (a collective): the same format a
    single process saves, so a checkpoint resumes under any world size."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: full_tensor(v) if torch.is_tensor(v) else v for k, v in s.items()}
                      for i, s in sorted(state["state"].items())}
    return state


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of a whole state: lay each sharded parameter's state tensors out like it."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if is_sharded(p) and p in optimizer.state:
                optimizer.state[p] = {k: like_param(v, p) if torch.is_tensor(v) and v.shape == p.shape else v
                                      for k, v in optimizer.state[p].items()}
