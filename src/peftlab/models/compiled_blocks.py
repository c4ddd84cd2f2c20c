"""``torch.compile`` of the transformer blocks for training (``train.compile``).

Each block's call is compiled on its own (regional compilation, as PyTorch's recipe for repeated blocks): the blocks
of one model share their code, so dynamo traces one graph for all of them instead of one for the whole trunk, and
AOTAutograd derives the backward graph from it; inductor then fuses the elementwise work around the matmuls (norms,
rotary embeddings, SiLU x up, residual adds, the method's own elementwise parts) in the forward and the backward.
What stays eager: the embeddings, the final norm, the output head and the cross-entropy on the labelled rows (a
data-dependent row count), and the optimizer.

Settings and why:

* ``dynamic=True``: length bucketing makes every batch a different (B, T); the graph is traced with symbolic sizes
  from the start, so a new length does not recompile (dynamo still specialises sizes 0 and 1, and autograd mode:
  training, validation under ``no_grad``, and a frozen block vs a trained one are separate graphs).
* ``fullgraph=True``: a block that dynamo cannot trace in one piece fails at its first call with an error that says
  so (:class:`CompileError`), instead of running silently in pieces.
* inductor's ``fallback_random=True``: dropout draws from torch's generator as the eager forward does, so the masks,
  the trained weights and an exact resume do not depend on whether the blocks were compiled.

Results equal the eager run's within float rounding (fused kernels sum in another order; tests/test_compile.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from peftlab.models.arch import transformer_blocks

KEY = "train.compile"
BACKEND = "inductor"  # tests swap in "aot_eager" (dynamo + AOTAutograd, no code generation) to stay fast
INDUCTOR_OPTIONS = {"fallback_random": True}


class CompileError(ValueError):
    """The blocks could not be compiled; the message names the model, the method and the way out."""


def compile_blocks(model: nn.Module, enabled: bool = True) -> int:
    """Compile (or stop compiling) the call of every transformer block of ``model`` in place.

    Parameters, state dict, hooks and module names do not change (``nn.Module.compile``, not a wrapper module).

    Returns:
        The number of blocks whose call is compiled afterwards (0 after ``enabled=False``).
    """
    blocks = transformer_blocks(model)
    options = {"options": INDUCTOR_OPTIONS} if BACKEND == "inductor" else {}
    for block in blocks:
        if enabled:
            block.compile(backend=BACKEND, dynamic=True, fullgraph=True, **options)
        else:
            block._compiled_call_impl = None  # what nn.Module.compile set; None restores the eager call
    return sum(getattr(block, "_compiled_call_impl", None) is not None for block in blocks)


@contextlib.contextmanager
def compiled_blocks(model: nn.Module, method_name: str, enabled: bool = True) -> Iterator[None]:
    """Within the context every block of ``model`` runs compiled (:func:`compile_blocks`); on exit they run eager
    again (evaluation and generation after training are not affected).

    Args:
        model: the model being trained.
        method_name: the method's class name, for the error message.
        enabled: False makes this a no-op.

    Raises:
        CompileError: dynamo could not trace a block in one graph, or the backend failed (the original error is
            chained).
    """
    if not enabled:
        yield
        return
    compile_blocks(model)
    from torch._dynamo.exc import TorchDynamoException  # imported by compiling; not at module import (slow)

    try:
        yield
    except TorchDynamoException as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompileError(f"{KEY}=true: the transformer blocks of {type(model).__name__} with {method_name} could "
                           f"not be compiled ({type(exc).__name__}: {first_line}); set {KEY}=false") from exc
    finally:
        compile_blocks(model, enabled=False)


def eager() -> contextlib.AbstractContextManager:
    """Run compiled code eagerly inside the context (generation for the validation metric during training: a
    KV-cache loop that the training graphs were not made for)."""
    return torch.compiler.set_stance("force_eager")
