"""What the benchmark scripts' command lines share: a parser described by the script's docstring with the timing
options, the usual model/data/workload options, and applying ``--threads``.

The scripts run as ``python benchmarks/<name>.py``, which puts this folder on ``sys.path``: they import this module
as ``bench_common`` (as ``benchmarks/speed/`` does with ``speed_common``).
"""

from __future__ import annotations

import argparse

import torch

DEFAULT_MODEL = "smollm2-135m"


def benchmark_parser(doc: str, *, repeats: int = 3, threads: int = 0,
                     repeats_help: str = "timed rounds of each variant (after an untimed warm-up)",
                     ) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of ``doc`` (the script's docstring), with ``--repeats``
    and ``--threads`` (torch intra-op threads; 0 leaves torch's default); see :func:`parse_benchmark_args`."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    parser.add_argument("--threads", type=int, default=threads, help="torch intra-op threads (0: torch's default)")
    return parser


def add_workload_options(parser: argparse.ArgumentParser, *, data: str, examples: int, batch_size: int,
                         examples_help: str = "examples per timing",
                         batch_help: str = "examples per batch") -> None:
    """``--model`` (alias, local folder, .gguf or hub id), ``--data`` (a data folder), ``--examples`` and
    ``--batch-size``: what a timing of one model on one data set takes."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="alias, local HF folder, .gguf or hub id")
    parser.add_argument("--data", default=data, help="data folder")
    parser.add_argument("--examples", type=int, default=examples, help=examples_help)
    parser.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)


def parse_benchmark_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` and set torch's intra-op thread count from ``--threads`` (when not 0)."""
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
