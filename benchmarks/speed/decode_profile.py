"""Where a greedy decode step's time goes: torch.profiler over a few decode steps of the continuous-batching path.

The steps run as evaluation runs them (:func:`peftlab.evaluation.generate.decode_step` over a slot KV cache, or
its compiled form), at as many rows as prompts given, after one unprofiled step (which compiles, when compiled).
The result groups the operators' self CPU time into matmuls, attention, cache writes and copies, elementwise work
and the rest. Under a profiler and on a shared machine, the absolute times are not ones to publish; the shares
are what to read.
"""

from __future__ import annotations

import contextlib
import time
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from peftlab.evaluation.generate import compiled_decode_step, decode_step, prefill
from peftlab.evaluation.kv_cache import to_slots
from peftlab.methods.base import PeftMethod

# Operator-name fragments per group, tried in this order (the first match wins).
GROUPS = {
    "attention": ("scaled_dot_product", "_flash_attention", "softmax", "baddbmm", "bmm"),
    "matmul": ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "mkldnn", "mkl_", "_linear_pointwise"),
    "cache writes and copies": ("index_put", "index_copy", "copy_", "aten::cat", "index_select", "clone",
                                "contiguous", "aten::to", "_to_copy"),
    "elementwise (norms, activations, RoPE, residuals)": (
        "aten::mul", "aten::add", "aten::silu", "aten::rsqrt", "aten::pow", "aten::mean", "aten::neg", "aten::sub",
        "aten::div", "aten::gelu", "aten::tanh", "aten::cos", "aten::sin", "cpp_fused", "aten::layer_norm",
        "aten::native_layer_norm", "aten::exp", "aten::where", "aten::masked_fill"),
    "argmax and masks": ("argmax", "aten::eq", "aten::bitwise", "aten::any", "aten::all", "aten::isin",
                         "aten::arange", "aten::full", "aten::zeros", "aten::ones", "aten::le", "aten::lt"),
}


def group_of(op: str) -> str:
    return next((group for group, parts in GROUPS.items() if any(part in op for part in parts)), "other")


@torch.no_grad()
def profile_decode_steps(method: PeftMethod, prompts: list[list[int]], pad_id: int, device: torch.device,
                         steps: int, compiled: bool = False,
                         precision: AbstractContextManager | None = None) -> dict[str, Any]:
    """Profile ``steps`` decode steps at ``len(prompts)`` rows over the prompts' cache, inside ``precision``
    (evaluation's bf16 autocast, say: ``ModelPredictor.precision()``).

    Returns ``text`` (the operator table and the grouped shares, printable), ``groups`` (group -> share of the
    self CPU time), ``ops`` (the 15 operators with most self CPU time: name, calls, milliseconds) and
    ``ms_per_step`` (profiled wall time per step, profiler overhead included).
    """
    with precision or contextlib.nullcontext():
        state = prefill(method, prompts, pad_id, device)
        slots = to_slots(state.cache, state.attention_mask, state.attention_mask.shape[1] + steps + 1,
                         static=compiled)
        if slots is None:
            raise ValueError("this model's KV cache is not plain: no slot cache to profile")
        step = compiled_decode_step() if compiled else decode_step
        token, position = state.logits.argmax(-1), state.position
        advancing = torch.ones_like(token, dtype=torch.bool)

        def one_step() -> None:
            nonlocal token, position
            position = position + 1
            logits = step(method.model, token[:, None], slots.begin_step(), position, state.cache)
            slots.end_step(advancing)
            token = logits.argmax(-1)

        one_step()  # unprofiled: compiles when compiled, first-call costs otherwise
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                one_step()
            ms_per_step = (time.perf_counter() - start) * 1e3 / steps
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = {}
    for e in events:
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + e.self_cpu_time_total / total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    ops = [{"op": e.key, "calls": e.count, "ms": e.self_cpu_time_total / 1e3} for e in top]
    lines = [f"{steps} decode steps at {len(prompts)} rows, {slots.attended} cache columns, "
             f"{'compiled' if compiled else 'eager'}: {ms_per_step:.1f} ms per step under the profiler",
             "self CPU time by group: " + ", ".join(f"{g} {share:.0%}" for g, share in
                                                     sorted(groups.items(), key=lambda kv: -kv[1])),
             "top operators (self CPU ms, calls):"]
    lines += [f"  {o['ms']:9.1f}  {o['calls']:6d}  {o['op']}" for o in ops]
    return {"text": "\n".join(lines), "groups": groups, "ops": ops, "ms_per_step": ms_per_step}
