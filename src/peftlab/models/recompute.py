"""Recompute the cheap elementwise parts of each block in the backward pass instead of keeping them.

For one token of one Llama block, plain autograd keeps for the MLP ``down(act(gate(x)) * up(x))`` three or four
d_ff-wide tensors: g = gate(x) (for act's backward), a = act(g) and u = up(x) (for the product's backward), and the
product p = a * u when the down projection or a method on it (LoRA, IA3) needs its input. The norms' outputs are kept
by whatever trains after them (LoRA on q/k/v/gate/up). All of these are a few elementwise operations away from
tensors that are kept anyway, so :func:`recompute_elementwise` keeps only those:

* ``act(g) * u`` (Llama family) and ``act(h)`` (GPT-2, whose tanh-GELU keeps four d_ff-wide tensors) run in a
  :class:`RecomputedInBackward` function that keeps only its inputs g, u (or h) and recomputes ``act`` in its
  backward pass;
* each norm (RMSNorm, LayerNorm) runs in the same function, keeping only its input x (not rstd, not the normalised
  output);
* inside a block, while autograd saves tensors for the backward pass, a saved-tensor hook replaces a saved output of
  one of these functions (p, the norm outputs) by a *recipe*: the function and its inputs, which the function keeps
  anyway. The backward pass that needs the tensor runs the recipe again (elementwise work, no matmul).

The matmuls stay ordinary autograd and the modules are still called (``mlp.gate_proj(x)``), so any wrapper on a
projection (LoRA, DoRA, VeRA, IA3), around the MLP (adapters) or the block (gradient checkpointing) keeps working.
Recomputing runs the same operations on the same inputs, so losses and gradients are bitwise those of the plain
path (tests/test_recompute.py), in fp32 and under bf16 autocast (the forward's autocast state is restored for the
recomputation). Saved-tensor hooks already active around a block (CPU offload, a measurement) still see every
tensor that is really kept: the recipe hooks hand them on. Inside a gradient checkpoint (``torch.utils.checkpoint``,
``train.gradient_checkpointing``), which keeps nothing of the block anyway, recipes are not used; the functions
themselves still work there.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.llama.modeling_llama import LlamaMLP

from peftlab.models.arch import transformer_blocks

AutocastState = tuple[tuple[str, bool, torch.dtype], ...]


def _autocast_state() -> AutocastState:
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in devices)


class _Autocast:
    """Re-enter a recorded autocast state (a recomputation must run as the forward did); no context where the
    current state is the recorded one already (fp32 training: none)."""

    def __init__(self, state: AutocastState) -> None:
        now = set(_autocast_state())
        self.contexts = [torch.autocast(d, dtype=dtype, enabled=on) for d, on, dtype in state
                         if (d, on, dtype) not in now]

    def __enter__(self) -> None:
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc: Any) -> None:
        for c in reversed(self.contexts):
            c.__exit__(*exc)


class RecomputedInBackward(torch.autograd.Function):
    """``fn(*inputs)`` that keeps only ``inputs`` for the backward pass and runs ``fn`` again there.

    ``fn`` must be a deterministic function of ``inputs`` and of ``params`` (which it reads itself, e.g. a norm's
    weight): elementwise work and reductions, no randomness. The backward pass recomputes ``fn`` under the forward's
    autocast state with autograd on and differentiates that graph, so the gradients are the plain path's.

    Call as ``RecomputedInBackward.apply(fn, n_inputs, *inputs, *params)``; ``params`` are passed so that their
    gradients flow (and are only differentiated when they require grad).
    """

    @staticmethod
    def forward(ctx: Any, fn: Callable[..., torch.Tensor], n_inputs: int, *args: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.n_inputs, ctx.autocast = fn, n_inputs, _autocast_state()
        ctx.save_for_backward(*args[:n_inputs])
        ctx.params = args[n_inputs:]  # parameters: alive anyway, not activations
        return fn(*args[:n_inputs])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        needs = ctx.needs_input_grad[2:]
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs, strict=False)]
        wrt = [t for t in inputs if t.requires_grad] + [p for p, need in zip(ctx.params, needs[ctx.n_inputs:],
                                                                                strict=True) if need]
        with torch.enable_grad(), _Autocast(ctx.autocast):
            out = ctx.fn(*inputs)
        grads = iter(torch.autograd.grad(out, wrt, grad, allow_unused=True) if wrt else ())
        return None, None, *(next(grads) if need else None for need in needs)


def recomputed(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...],
               params: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """``fn(*inputs)`` through :class:`RecomputedInBackward`, its output offered to the current block's recipes."""
    out = RecomputedInBackward.apply(fn, len(inputs), *inputs, *params)
    if _RECIPES:
        _RECIPES[-1].offer(out, fn, inputs)
    return out


# ---- recipes: a saved output of a recomputed function is kept as (fn, inputs) ----------------------------------
class _Recipe:
    __slots__ = ("fn", "inputs", "size", "stride", "offset", "autocast")

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], saved: torch.Tensor,
                 autocast: AutocastState) -> None:
        self.fn, self.inputs, self.autocast = fn, inputs, autocast
        self.size, self.stride, self.offset = saved.size(), saved.stride(), saved.storage_offset()

    def rebuild(self) -> torch.Tensor:
        with torch.no_grad(), _Autocast(self.autocast):
            out = self.fn(*self.inputs)
        return out.as_strided(self.size, self.stride, self.offset)  # the saved view of the output


class _BlockRecipes:
    """The recomputable outputs of one block's forward, by storage; the pack/unpack pair of its saved-tensor hooks.

    An output is offered only when it requires grad: then :class:`RecomputedInBackward` keeps its inputs for its own
    backward pass, which runs after every consumer's, so a recipe keeps nothing alive that is not kept anyway. The
    outputs are referenced until the block's forward ends, so their storage is not reused by another tensor that a
    later operation of the block saves.
    """

    def __init__(self, outer: tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]] | None) -> None:
        self.outputs: dict[int, tuple[torch.Tensor, int, Callable[..., torch.Tensor], tuple[torch.Tensor, ...],
                                      AutocastState]] = {}
        self.outer = outer  # hooks that were active before the block's: what is really kept goes through them

    def offer(self, out: torch.Tensor, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> None:
        if out.requires_grad and out.is_contiguous() and out.storage_offset() == 0:
            self.outputs[out.untyped_storage().data_ptr()] = (out, out._version, fn, inputs, _autocast_state())

    def pack(self, t: torch.Tensor) -> Any:
        entry = None
        if t.layout == torch.strided and not t.is_nested:
            entry = self.outputs.get(t.untyped_storage().data_ptr())
        if entry is not None:
            out, version, fn, inputs, autocast = entry
            if t.dtype == out.dtype and t._version == version == out._version:  # not changed in place since
                return _Recipe(fn, inputs, t, autocast)
        return self.outer[0](t) if self.outer else t

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, _Recipe):
            return packed.rebuild()
        return self.outer[1](packed) if self.outer else packed


_RECIPES: list[_BlockRecipes] = []  # the blocks whose forward is running (innermost last)


def _outer_saved_tensor_hooks() -> tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]] | None:
    """The saved-tensor hooks active now (innermost), or None."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def _is_checkpoint(hooks: tuple[Callable[..., Any], ...]) -> bool:
    """True for ``torch.utils.checkpoint``'s hooks (its forward, ``_checkpoint_hook``, and its replay,
    ``_recomputation_hook``): a checkpointed block keeps nothing, and a recipe would keep its inputs alive."""
    return any(name in getattr(hooks[0], "__qualname__", "") for name in ("_checkpoint_hook", "_recomputation_hook"))


# ---- the forwards installed on modules --------------------------------------------------------------------------
class _InstalledForward:
    """An instance-level ``forward``; ``previous``: one set before (accelerate's, ...), given back on removal."""

    def __init__(self, module: nn.Module, previous: Any = None) -> None:
        self.module, self.previous = module, previous

    def original(self, *args: Any, **kwargs: Any) -> Any:
        forward = self.previous if self.previous is not None else partial(type(self.module).forward, self.module)
        return forward(*args, **kwargs)


class BlockRecipesForward(_InstalledForward):
    """A block's forward with the recipe hooks around it (training with autograd on, no outer hooks)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        outer = _outer_saved_tensor_hooks()
        if not torch.is_grad_enabled() or (outer is not None and _is_checkpoint(outer)):
            return self.original(*args, **kwargs)
        recipes = _BlockRecipes(outer)
        _RECIPES.append(recipes)
        try:
            with torch.autograd.graph.saved_tensors_hooks(recipes.pack, recipes.unpack):
                return self.original(*args, **kwargs)
        finally:
            _RECIPES.pop()
            # Every saved variable packed here holds ``recipes.unpack`` until its backward pass: without this the
            # registry would keep each offered output alive too (down's input, the norm outputs), undoing the cut.
            recipes.outputs.clear()


def _gated_product(act: nn.Module, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return act(g) * u  # (..., d_ff)


class GatedMLPForward(_InstalledForward):
    """Llama's ``down(act(gate(x)) * up(x))`` with the product recomputed in the backward pass."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.original(x)
        mlp = self.module
        g, u = mlp.gate_proj(x), mlp.up_proj(x)  # (B, T, d) -> (B, T, d_ff); gate first, as the plain forward
        return mlp.down_proj(recomputed(partial(_gated_product, mlp.act_fn), (g, u)))


class ActivationMLPForward(_InstalledForward):
    """GPT-2's ``dropout(proj(act(fc(x))))`` with the activation recomputed in the backward pass."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.original(x)
        mlp = self.module
        h = mlp.c_fc(x)  # (B, T, d) -> (B, T, d_ff)
        return mlp.dropout(mlp.c_proj(recomputed(mlp.act, (h,))))


class NormForward(_InstalledForward):
    """A norm whose output a consumer keeps as a recipe from its input.

    With a trainable weight (full fine-tuning, BitFit), the norm runs in :class:`RecomputedInBackward` and keeps only
    its input, instead of input, statistics and the normalised output. With frozen parameters the plain norm keeps
    its input and (B, T, 1) statistics only, so it stays plain autograd (bitwise the plain gradients) and only its
    output is offered as a recipe.
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.original(x)
        params = tuple(self.module.parameters())
        if any(p.requires_grad for p in params):
            return recomputed(self.original, (x,), params)
        out = self.original(x)
        if _RECIPES and x.requires_grad:  # then the plain norm's backward nodes keep x until after the consumers'
            _RECIPES[-1].offer(out, self.original, (x,))
        return out


# ---- install / remove ---------------------------------------------------------------------------------------------
def _same_forward(cls: type, reference: type) -> bool:
    """True when ``cls.forward`` is the very code of ``reference.forward`` (Mistral, Qwen2, ... copy Llama's MLP):
    only a forward known to compute ``down(act(gate(x)) * up(x))`` (or GPT-2's) is rewritten."""
    a, b = cls.forward.__code__, reference.forward.__code__
    return (a.co_code, a.co_names, a.co_consts) == (b.co_code, b.co_names, b.co_consts)


def _mlp_forward(module: nn.Module) -> type[_InstalledForward] | None:
    if _same_forward(type(module), LlamaMLP):
        return GatedMLPForward
    if _same_forward(type(module), GPT2MLP):
        return ActivationMLPForward
    return None


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or (type(module).__name__.endswith("RMSNorm")
                                                and not list(module.children()))


def recompute_elementwise(model: nn.Module, enabled: bool = True) -> int:
    """Switch elementwise recomputation (see the module docstring) on or off for every block and norm of ``model``.

    Memory: per token and block, a Llama MLP keeps g and u instead of g, act(g), u (and p when the down projection
    trains or is wrapped), and what trains after a norm no longer keeps its output; the price is the elementwise
    work again in the backward pass, no matmul. Eval mode under ``torch.no_grad()`` (validation, generation) runs the
    plain forwards. Parameters and state dict do not change. Install it before a method or after, before or after
    gradient checkpointing.

    Args:
        model: a GPT-2 or Llama-family causal LM.
        enabled: True installs the forwards (idempotent), False removes them (a no-op when absent).

    Returns:
        The number of blocks whose MLP is recomputed afterwards (0 after ``enabled=False``).

    Raises:
        TypeError: some block's MLP is neither Llama's gated MLP nor GPT-2's (its class is named).
    """
    blocks = transformer_blocks(model)
    if enabled:
        for block in blocks:
            if not any(_mlp_forward(m) for m in block.modules()):
                names = sorted({type(m).__name__ for m in block.children()})
                raise TypeError(
                    f"train.recompute_elementwise knows Llama-family gated MLPs (down(act(gate(x)) * up(x)), the code "
                    f"of LlamaMLP.forward) and GPT-2's MLP; a block of {type(model).__name__} ({', '.join(names)}) "
                    f"has neither: set train.recompute_elementwise=false")
    targets: list[tuple[nn.Module, type[_InstalledForward]]] = [(b, BlockRecipesForward) for b in blocks]
    for module in model.modules():
        kind = _mlp_forward(module) or (NormForward if _is_norm(module) else None)
        if kind is not None:
            targets.append((module, kind))
    for module, kind in targets:
        _set_installed(module, kind, enabled)
    return elementwise_recomputed(model)


def _set_installed(module: nn.Module, kind: type[_InstalledForward], enabled: bool) -> None:
    """Install ``kind`` as ``module``'s forward or remove it, also when another wrapper (gradient checkpointing's
    ``CheckpointedForward``, which has ``previous`` too) was installed on top of it."""
    holder, current = module, module.__dict__.get("forward")
    while current is not None and not isinstance(current, _InstalledForward) and hasattr(current, "previous"):
        holder, current = current, current.previous
    if isinstance(current, _InstalledForward):
        if not enabled:
            if holder is module and current.previous is None:
                del module.forward
            elif holder is module:
                module.forward = current.previous
            else:
                holder.previous = current.previous
    elif enabled:
        if holder is module:
            module.forward = kind(module, current)
        else:  # below another wrapper: take the place of its ``previous``
            holder.previous = kind(module, current)


def elementwise_recomputed(model: nn.Module) -> int:
    """How many blocks of ``model`` have :func:`recompute_elementwise`'s MLP forward installed."""
    def installed(m: nn.Module) -> bool:
        current = m.__dict__.get("forward")
        while current is not None and not isinstance(current, _InstalledForward) and hasattr(current, "previous"):
            current = current.previous
        return isinstance(current, (GatedMLPForward, ActivationMLPForward))

    return sum(any(installed(m) for m in block.modules()) for block in transformer_blocks(model))
