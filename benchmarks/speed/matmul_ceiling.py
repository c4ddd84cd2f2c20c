"""The practical FLOP ceiling of this machine: the GFLOP/s of one large square matmul, in the training dtype.

A training step can at best run at the speed of its matmuls; a large, square, contiguous matmul is the best case
the BLAS (CPU) or cuBLAS (GPU) library reaches, so achieved model FLOP/s divided by this rate is the model-FLOP
utilisation (MFU) against a ceiling measured here, now, with the same thread count, rather than a datasheet
number. C = A B with A, B (n, n) costs 2 n^3 FLOPs; the best of several timed rounds is reported (the machine's
capability, not its noise).

Usage: python benchmarks/speed/matmul_ceiling.py [--size 2048] [--dtype fp32|bf16] [--device cpu|cuda]
       [--threads N] [--min-seconds 1.0]
Prints a human line on stderr and one ``SPEED_RESULT {json}`` line on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
from speed_common import DTYPES, choice, emit, synchronize

DEFAULT_SIZE = {"cpu": 2048, "cuda": 8192}


def measure(size: int, dtype: str = "fp32", device: str = "cpu", min_seconds: float = 1.0,
            rounds: int = 3) -> dict[str, Any]:
    """GFLOP/s of an (n, n) x (n, n) matmul: the best of ``rounds`` rounds of at least ``min_seconds`` each.

    Args:
        size: n.
        dtype: ``fp32`` or ``bf16``.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        min_seconds: each round repeats the matmul until this much time has passed.
        rounds: timed rounds (one untimed call first warms up the library and the caches).

    Returns:
        ``{"gflops", "size", "dtype", "device", "threads", "round_gflops"}``.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dev, DTYPES[dtype])
    b = torch.randn(size, size, generator=gen).to(dev, DTYPES[dtype])
    out = torch.empty_like(a)
    torch.mm(a, b, out=out)
    synchronize(dev)
    flops = 2.0 * size**3
    per_round = []
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            calls += 1
            synchronize(dev)  # per call: a round ends on real completion, not on queued work
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        per_round.append(calls * flops / elapsed / 1e9)
    return {"gflops": max(per_round), "size": size, "dtype": dtype, "device": str(dev),
            "threads": torch.get_num_threads(), "round_gflops": per_round}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=None, help="matrix size n (default: 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="minimum length of each of the 3 timed rounds")
    args = p.parse_args(argv)
    choice(args.dtype, DTYPES, "--dtype")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    size = args.size or DEFAULT_SIZE[torch.device(args.device).type]
    result = measure(size, args.dtype, args.device, args.min_seconds)
    print(f"matmul {size}^3 {args.dtype} on {result['device']} ({result['threads']} threads): "
          f"{result['gflops']:.1f} GFLOP/s", flush=True, file=sys.stderr)
    emit(result)
    return result


if __name__ == "__main__":
    main()
