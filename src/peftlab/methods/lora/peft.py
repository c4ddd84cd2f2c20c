"""LoRA <-> Hugging Face PEFT ``LORA`` (rsLoRA, DoRA, GPT-2 slices, rank/alpha patterns).

Export: ``<module>.lora_A.weight`` (r, d_in), ``<module>.lora_B.weight`` (d_out, r) and DoRA's
``<module>.lora_magnitude_vector`` (d_out,) are PEFT's keys already. GPT-2 q/k/v *slices* of the fused ``c_attn``
become one PEFT LoRA on the whole ``c_attn`` of rank n r (n slices), with stacked A and block B::

    A' = [A_q; A_v]  (2r, d)      B' = [[B_q, 0], [0, 0], [0, B_v]]  (3d, 2r)      B' A' = [B_q A_q; 0; B_v A_v]

and the same scaling: alpha' = scaling * n r (rsLoRA: scaling * sqrt(n r)). PEFT's ``fan_in_fan_out`` is True for
GPT-2's ``Conv1D``. When whole-module and sliced targets mix (e.g. q, v and o), the sliced modules get their rank
and alpha through PEFT's ``rank_pattern`` / ``alpha_pattern``. DoRA's magnitude of an untouched column (k) is that
column's weight norm ||W_k||, which makes PEFT's factor m / ||W + s B'A'|| exactly 1 there.

Import: r -> r, lora_alpha -> alpha, lora_dropout -> dropout, use_rslora -> rslora, use_dora -> use_dora,
target_modules -> target_modules (same rule: a name or dotted suffix per item, a regex string matched in full, or
"all-linear"). GPT-2 c_attn LoRAs stay whole-module LoRAs. rank_pattern / alpha_pattern (per-module rank r_m and
scaling s_m): peftlab has one rank R and one scaling s, so every module is padded to R = max r_m with zero rows of A
and zero columns of B, and s_m / s is folded into B:  s [B_m s_m/s, 0] [A_m; 0] = s_m B_m A_m  (DoRA sees the same
W + s_m B_m A_m, so it is exact too). ``init_lora_weights`` pissa / olora map to ``init`` (the residual base is
recomputed from the untouched base on loading); the other base-mutating ones (CorDA, LoftQ, ...) are refused.
A PiSSA / OLoRA LoRA exports as the plain rank-2r LoRA [B, -B0] [A; A0] on the untouched base.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.interop.peft_format import (
    PEFT_KEY_PREFIX,
    Exported,
    PeftConverter,
    PeftFormatError,
    base_module_names,
    minimal_names,
    peft_list_match,
    required,
)

# init_lora_weights values that only initialise A and B; the others (CorDA, LoftQ, MiCA, ...) change the base weights
# or the forward, so the adapter is not a plain LoRA on the unchanged base. PiSSA and OLoRA change the base by a
# function of the base alone, which LoRA's own init option recomputes (MUTATING_INITS).
PLAIN_LORA_INITS = (True, False, "gaussian", "eva", "orthogonal")
MUTATING_INITS = {"pissa": "pissa", "olora": "olora"}


def _out_features(layer: nn.Module) -> int:
    return layer.base_layer.weight.shape[1 if layer.fan_in_fan_out else 0]


def _lora_tensors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(A', B', m') of one LoRA layer as PEFT holds them for the whole module (block form for slices); a PiSSA /
    OLoRA branch as the plain rank-2r LoRA on the untouched base (``LoraLinear.plain_lora``)."""
    whole = next(iter(layer.slices))
    if layer.whole:
        a, b = layer.plain_lora(whole)
        return a, b, layer.lora_magnitude_vector[whole] if layer.use_dora else None
    keys = sorted(layer.slices, key=lambda k: layer.slices[k])
    pairs = [layer.plain_lora(k) for k in keys]
    r = pairs[0][0].shape[0]
    a = torch.cat([pa.detach() for pa, _ in pairs])  # (n r, d_in)
    b = a.new_zeros(_out_features(layer), len(keys) * r)  # (d_out, n r), zero outside the diagonal blocks
    for i, (key, (_, pb)) in enumerate(zip(keys, pairs, strict=True)):
        start, stop = layer.slices[key]
        b[start:stop, i * r:(i + 1) * r] = pb.detach()
    magnitude = None
    if layer.use_dora:
        w = layer.base_layer.weight.detach()
        rows = (w.T if layer.fan_in_fan_out else w).to(a.dtype).contiguous()  # (d_out, d_in)
        magnitude = torch.linalg.norm(rows, dim=1)  # untouched columns: ||W_row||, so PEFT's factor is 1
        for key in keys:
            start, stop = layer.slices[key]
            magnitude[start:stop] = layer.lora_magnitude_vector[key].detach()
    return a, b, magnitude


def _lora_alpha(scaling: float, rank: int, rslora: bool) -> float:
    """PEFT's lora_alpha giving ``scaling`` at ``rank`` (PEFT: alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    return scaling * (rank**0.5 if rslora else rank)


def export_lora(method: Any, base: str | None) -> Exported:
    cfg, layers = method.config, method.layers
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, layer in layers.items():
        a, b, magnitude = _lora_tensors(layer)
        state[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = a
        state[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = b
        if magnitude is not None:
            state[f"{PEFT_KEY_PREFIX}{name}.lora_magnitude_vector"] = magnitude
        ranks[name] = a.shape[0]
    universe = base_module_names(method.model, layers)
    r, alpha = cfg.r, cfg.alpha
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    if len(set(ranks.values())) == 1 and cfg.r not in ranks.values():  # every target sliced alike: one rank
        r = next(iter(ranks.values()))
        alpha = _lora_alpha(cfg.scaling, r, cfg.rslora)
    else:
        for rank in sorted(set(ranks.values()) - {cfg.r}):
            chosen = [n for n in layers if ranks[n] == rank]
            for pattern in minimal_names(chosen, universe, peft_list_match):
                rank_pattern[re.escape(pattern)] = rank  # PEFT matches pattern keys as regexes
                alpha_pattern[re.escape(pattern)] = _lora_alpha(cfg.scaling, rank, cfg.rslora)
    options = {
        "r": r, "lora_alpha": alpha, "lora_dropout": cfg.dropout,
        "target_modules": minimal_names(list(layers), universe, peft_list_match),
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()), "bias": "none",
        "use_rslora": cfg.rslora, "use_dora": cfg.use_dora, "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "init_lora_weights": True, "layers_to_transform": None,
        "layers_pattern": None, "exclude_modules": None,
    }
    return options, state


def _lora_options(config: dict[str, Any], where: Path) -> dict[str, Any]:
    init = config.get("init_lora_weights", True)
    if init not in PLAIN_LORA_INITS and init not in MUTATING_INITS:
        raise PeftFormatError(
            f"{where}: init_lora_weights={init!r} is not supported: that initialisation changes the base weights or "
            f"the forward pass; convert the adapter with PEFT's save_pretrained(..., "
            f"path_initial_model_for_weight_conversion=...) first (supported: "
            f"{(*PLAIN_LORA_INITS, *MUTATING_INITS)})")
    rank, scaling = _lora_rank_and_scaling(config, where)
    rslora = bool(config.get("use_rslora"))
    # alpha giving scaling s at rank R (PEFT's own lora_alpha when R = r, so a plain adapter keeps its numbers)
    alpha = config["lora_alpha"] if rank == config["r"] else scaling * (rank**0.5 if rslora else rank)
    return {"r": rank, "alpha": alpha, "dropout": config.get("lora_dropout") or 0.0,
            "target_modules": required(config, "target_modules", where), "rslora": rslora,
            "use_dora": bool(config.get("use_dora")),
            **({"init": MUTATING_INITS[init]} if init in MUTATING_INITS else {})}


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first key k with ``re.match(rf"(.*\\.)?({k})$", module)`` gives the value."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _patterns(config: dict[str, Any], key: str, where: Path) -> dict[str, Any]:
    patterns = config.get(key) or {}
    if not isinstance(patterns, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in patterns.values()):
        raise PeftFormatError(f"{where}: {key} must map module patterns to numbers > 0, got {patterns!r}")
    return patterns


def _lora_rank_and_scaling(config: dict[str, Any], where: Path) -> tuple[int, float]:
    """peftlab's rank R (the largest PEFT rank) and scaling s (PEFT's default one: lora_alpha / r or / sqrt(r))."""
    r, alpha = required(config, "r", where), required(config, "lora_alpha", where)
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise PeftFormatError(f"{where}: r and lora_alpha must be > 0, got r={r!r}, lora_alpha={alpha!r}")
    ranks = _patterns(config, "rank_pattern", where)
    _patterns(config, "alpha_pattern", where)
    return max([r, *ranks.values()]), alpha / (r**0.5 if config.get("use_rslora") else r)


def _lora_state(config: dict[str, Any], state: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """Pad every module's A and B to peftlab's rank R and fold s_m / s into B (see the module docstring)."""
    if not config.get("rank_pattern") and not config.get("alpha_pattern"):
        return state
    rank, scaling = _lora_rank_and_scaling(config, where)
    rslora = bool(config.get("use_rslora"))
    converted = {}
    for key, value in state.items():
        if key.endswith(".lora_A.weight") and value.shape[0] < rank:
            value = torch.cat([value, value.new_zeros(rank - value.shape[0], value.shape[1])])  # (R, d_in)
        elif key.endswith(".lora_B.weight"):
            module = key.removesuffix(".lora_B.weight")
            r_m = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
            alpha_m = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
            value = value * ((alpha_m / (r_m**0.5 if rslora else r_m)) / scaling)
            if value.shape[1] < rank:
                value = torch.cat([value, value.new_zeros(value.shape[0], rank - value.shape[1])], dim=1)  # (d_out, R)
        converted[key] = value
    return converted


class LoraConverter(PeftConverter):
    """LoRA <-> PEFT ``LORA`` (see the module docstring)."""

    peft_type = "LORA"
    mapped = frozenset({"r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora",
                        "init_lora_weights", "rank_pattern", "alpha_pattern"})
    ignored = frozenset({"fan_in_fan_out", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
                         "megatron_core", "qalora_group_size", "runtime_config", "ensure_weight_tying"})

    def export(self, method: Any, base: str | None) -> Exported:
        return export_lora(method, base)

    def import_options(self, config: dict[str, Any], where: Path) -> dict[str, Any]:
        return _lora_options(config, where)

    def convert_state(self, config: dict[str, Any], state: dict[str, torch.Tensor],
                      where: Path) -> dict[str, torch.Tensor]:
        return _lora_state(config, state, where)
