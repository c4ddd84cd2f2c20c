"""VeRA <-> Hugging Face PEFT ``VERA``.

PEFT keeps one shared pair of projections for the whole model and saves it (``save_projection``, default true) under
the model-level keys ``base_model.vera_A`` (r, max d_in) and ``base_model.vera_B`` (max d_out, r), outside the
``base_model.model.`` prefix of the per-layer vectors ``<module>.vera_lambda_b`` (d_out,) and
``<module>.vera_lambda_d`` (r,). Without saved projections PEFT redraws them from ``projection_prng_key`` with a CPU
generator (A first, then B), as :func:`.layer.shared_projections` does.

Export: the vectors under PEFT's keys; a sliced GPT-2 ``c_attn`` becomes one whole-layer lambda_b with zeros on the
untouched columns (its slices already share lambda_d and use the rows of B the whole layer would). Import: r,
target_modules, projection_prng_key, save_projection, vera_dropout -> dropout, d_initial; GPT-2 ``c_attn`` stays a
whole-module VeRA. PEFT's ``bias`` other than "none" is refused (it trains base biases).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from peftlab.interop.peft_format import PEFT_KEY_PREFIX, Exported, PeftConverter, peft_target_modules, required

# PEFT's model-level keys of the shared projections (not under base_model.model.); ours are vera_A / vera_B.
PEFT_PROJECTION_KEYS = {"base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"}


def export_vera(method: Any, base: str | None) -> Exported:
    cfg, layers = method.config, method.layers
    state: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        state[f"{PEFT_KEY_PREFIX}{name}.vera_lambda_b"] = layer.full_lambda_b()
        state[f"{PEFT_KEY_PREFIX}{name}.vera_lambda_d"] = layer.vera_lambda_d.detach()
    for peft_key, ours in PEFT_PROJECTION_KEYS.items():  # always saved: an export must not depend on a generator
        state[peft_key] = getattr(next(iter(layers.values())), ours)
    options = {
        "r": cfg.r, "target_modules": peft_target_modules(method.model, layers),
        "projection_prng_key": cfg.projection_prng_key, "save_projection": True, "vera_dropout": cfg.dropout,
        "d_initial": cfg.d_initial, "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "bias": "none", "init_weights": True, "layers_to_transform": None, "layers_pattern": None,
    }
    return options, state


class VeraConverter(PeftConverter):
    """VeRA <-> PEFT ``VERA`` (see the module docstring)."""

    peft_type = "VERA"
    mapped = frozenset({"r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "d_initial"})
    ignored = frozenset({"fan_in_fan_out", "init_weights"})

    def export(self, method: Any, base: str | None) -> Exported:
        return export_vera(method, base)

    def import_options(self, config: dict[str, Any], where: Path) -> dict[str, Any]:
        return {"r": required(config, "r", where), "target_modules": required(config, "target_modules", where),
                "projection_prng_key": config.get("projection_prng_key") or 0,
                "save_projection": bool(config.get("save_projection", True)),
                "dropout": config.get("vera_dropout") or 0.0, "d_initial": config.get("d_initial", 0.1)}

    def convert_state(self, config: dict[str, Any], state: dict[str, torch.Tensor],
                      where: Path) -> dict[str, torch.Tensor]:
        return {PEFT_PROJECTION_KEYS.get(k, k): v for k, v in state.items()}
