"""Export a peftlab adapter as a Hugging Face PEFT adapter folder that ``PeftModel.from_pretrained`` loads.

Per method (keys relative to the base model; the file adds PEFT's ``base_model.model.`` prefix to layer methods):

* LoRA (rsLoRA, DoRA): ``<module>.lora_A.weight`` (r, d_in), ``<module>.lora_B.weight`` (d_out, r) and DoRA's
  ``<module>.lora_magnitude_vector`` (d_out,) are PEFT's keys already. GPT-2 q/k/v *slices* of the fused
  ``c_attn`` become one PEFT LoRA on the whole ``c_attn`` of rank n r (n slices), with stacked A and block B::

      A' = [A_q; A_v]  (2r, d)      B' = [[B_q, 0], [0, 0], [0, B_v]]  (3d, 2r)      B' A' = [B_q A_q; 0; B_v A_v]

  and the same scaling: alpha' = scaling * n r (rsLoRA: scaling * sqrt(n r)). PEFT's ``fan_in_fan_out`` is True for
  GPT-2's ``Conv1D``. When whole-module and sliced targets mix (e.g. q, v and o), the sliced modules get their
  rank and alpha through PEFT's ``rank_pattern`` / ``alpha_pattern``. DoRA's magnitude of an untouched column
  (k) is that column's weight norm ||W_k||, which makes PEFT's factor m / ||W + s B'A'|| exactly 1 there.
* IA3: ``<module>.ia3_l``, (d_out, 1) for output scaling and (1, d_in) for input scaling, PEFT's shapes; a sliced
  ``c_attn`` becomes one (3d, 1) vector with ones on the untouched slice.
* Prompt tuning: ``prompt_embeddings`` (n, d), PEFT's key.
* Prefix tuning: ``prompt_embeddings`` (n, L * 2 * k), PEFT's key and layout (layer-major, then key/value, then
  head, then head_dim; k = n_kv_heads * head_dim, so PEFT's ``token_dim`` = k and ``num_attention_heads`` =
  n_kv_heads, as PEFT itself records them for grouped-query models). An unfolded adapter is folded first
  (P = MLP(P')); the export has ``prefix_projection: false`` because the file holds P itself.

The safetensors metadata records the peftlab adapter the export came from (``peftlab_export``), which lets
:mod:`peftlab.interop.import_peft` restore GPT-2 slices exactly; PEFT ignores it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import peftlab
from peftlab.config import ModelConfig
from peftlab.durable import save_tensors
from peftlab.interop.peft_format import (
    EXPORT_METADATA_KEY,
    PEFT_CONFIG_NAME,
    PEFT_KEY_PREFIX,
    PEFT_TYPES,
    PEFT_WEIGHTS_NAME,
    PeftFormatError,
    atomic_folder,
    ensure_free,
    is_peft_folder,
    minimal_names,
    peft_list_match,
    peft_suffix_match,
)
from peftlab.methods.base import PeftMethod
from peftlab.methods.io import load_adapter, read_adapter_config
from peftlab.models.arch import transformer_blocks
from peftlab.models.loading import load_model_and_tokenizer, pretrained_source

Exported = tuple[dict[str, Any], dict[str, torch.Tensor]]


def check_exportable(method_name: str, where: str | Path = "") -> None:
    """Raise :class:`PeftFormatError` naming ``method_name`` and the exportable methods unless it is one."""
    if method_name not in EXPORTERS:
        raise PeftFormatError(
            f"{where}: method {method_name!r} has no Hugging Face PEFT equivalent that peftlab can export; "
            f"exportable methods: {', '.join(sorted(EXPORTERS))}")


def peft_export(method: PeftMethod, method_name: str, base_model_name_or_path: str | None = None) -> Exported:
    """PEFT's ``adapter_config.json`` contents and ``adapter_model.safetensors`` tensors for an applied method.

    Args:
        method: the method applied to its base model (the weights as trained).
        method_name: its registered name (``lora``, ``ia3``, ``prompt-tuning``, ``prefix-tuning``).
        base_model_name_or_path: recorded as PEFT's ``base_model_name_or_path``.

    Returns:
        The config dict and the tensors (CPU, contiguous, keys with PEFT's prefix where PEFT has one).

    Raises:
        PeftFormatError: the method cannot be exported (the message lists the ones that can).
    """
    check_exportable(method_name)
    options, state = EXPORTERS[method_name](method, base_model_name_or_path)
    config = {"peft_type": PEFT_TYPES[method_name], "task_type": "CAUSAL_LM",
              "base_model_name_or_path": base_model_name_or_path, "revision": None, "inference_mode": True,
              "auto_mapping": None, "modules_to_save": None, **options}
    return config, {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_peft_adapter(method: PeftMethod, method_name: str, out: str | Path,
                      base_model_name_or_path: str | None = None, base_model: str | None = None) -> Path:
    """Write ``out`` (atomically; an existing non-empty folder is refused) as a PEFT adapter folder.

    Args:
        method: the applied method.
        method_name: its registered name.
        out: the folder to create.
        base_model_name_or_path: PEFT's ``base_model_name_or_path`` (something ``from_pretrained`` can load).
        base_model: peftlab's ``model.name`` of the base, recorded in the file's metadata.
    """
    config, state = peft_export(method, method_name, base_model_name_or_path)
    record = {"method": method_name, "method_config": dataclasses.asdict(method.config), "base_model": base_model,
              "peftlab_version": peftlab.__version__}
    metadata = {"format": "pt", EXPORT_METADATA_KEY: json.dumps(record, default=str)}
    with atomic_folder(out) as tmp:
        save_tensors(state, tmp / PEFT_WEIGHTS_NAME, metadata=metadata)
        (tmp / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out)


def export_adapter(adapter: str | Path, out: str | Path, model_name: str | None = None) -> Path:
    """``peftlab export --adapter DIR --to peft OUT``: load the base and the adapter, write a PEFT folder.

    Args:
        adapter: a peftlab adapter folder (``adapter.safetensors`` + ``adapter_config.json``).
        out: the PEFT folder to create; must not exist or be empty.
        model_name: the base model (``model.name`` syntax); default: the one the adapter records.

    Raises:
        PeftFormatError: the method cannot be exported, or ``adapter`` is already a PEFT folder.
        OutputExistsError: ``out`` is not empty.
    """
    adapter = Path(adapter)
    ensure_free(out)
    if is_peft_folder(adapter):
        raise PeftFormatError(f"{adapter} is already a Hugging Face PEFT adapter folder; nothing to export")
    config = read_adapter_config(adapter)
    check_exportable(config["method"], adapter / "adapter_config.json")
    name = model_name or config["base_model"]
    model, _ = load_model_and_tokenizer(ModelConfig(name=name))
    method, _ = load_adapter(model, adapter)
    return save_peft_adapter(method, config["method"], out, pretrained_source(name), base_model=name)


def base_module_names(model: nn.Module, wrappers: dict[str, nn.Module]) -> list[str]:
    """Module paths of the base model: the model's, without what lives inside the method's wrapper layers."""
    names = []
    for name, _ in model.named_modules():
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        inside = False
        while parent:
            if parent in wrappers:
                inside = True
                break
            parent = parent.rsplit(".", 1)[0] if "." in parent else ""
        if name and not inside:
            names.append(name)
    return names


def _out_features(layer: nn.Module) -> int:
    return layer.base_layer.weight.shape[1 if layer.fan_in_fan_out else 0]


def _lora_tensors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(A', B', m') of one LoRA layer as PEFT holds them for the whole module (block form for slices)."""
    whole = next(iter(layer.slices))
    if layer.whole:
        return layer.lora_A[whole], layer.lora_B[whole], layer.lora_magnitude_vector[whole] if layer.use_dora else None
    keys = sorted(layer.slices, key=lambda k: layer.slices[k])
    r = layer.r
    a = torch.cat([layer.lora_A[k].detach() for k in keys])  # (n r, d_in)
    b = a.new_zeros(_out_features(layer), len(keys) * r)  # (d_out, n r), zero outside the diagonal blocks
    for i, key in enumerate(keys):
        start, stop = layer.slices[key]
        b[start:stop, i * r:(i + 1) * r] = layer.lora_B[key].detach()
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


def _export_lora(method: PeftMethod, base: str | None) -> Exported:
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


def _export_ia3(method: PeftMethod, base: str | None) -> Exported:
    layers = method.layers
    state: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        if layer.whole:
            vector = next(iter(layer.ia3_l.values()))  # (d_out, 1) or (1, d_in): PEFT's shapes
        else:
            vector = layer.output_scale().detach().view(-1, 1)  # ones on the untouched slices
        state[f"{PEFT_KEY_PREFIX}{name}.ia3_l"] = vector
    universe = base_module_names(method.model, layers)
    feedforward = [n for n, layer in layers.items() if layer.feedforward]
    options = {
        "target_modules": minimal_names(list(layers), universe, peft_list_match),
        # PEFT matches feedforward names as plain suffixes, peftlab as dotted ones: names that select the same
        # modules under the looser rule (over every module) select them under both.
        "feedforward_modules": minimal_names(feedforward, universe, peft_suffix_match),
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "init_ia3_weights": True, "exclude_modules": None,
    }
    return options, state


def _prompt_learning_shape(model: nn.Module) -> dict[str, int]:
    return {"num_transformer_submodules": 1, "num_layers": len(transformer_blocks(model)),
            "num_attention_heads": int(model.config.num_attention_heads)}


def _export_prompt_tuning(method: PeftMethod, base: str | None) -> Exported:
    prompt = method.prompt  # (n, d)
    cfg = method.config
    init = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB"}.get(cfg.init, "RANDOM")
    text = cfg.init_text if cfg.init == "text" and cfg.init_text and base else None
    options = {
        "num_virtual_tokens": int(prompt.shape[0]), "token_dim": int(prompt.shape[1]),
        **_prompt_learning_shape(method.model),
        # Only used by PEFT when it initialises a trainable prompt (is_trainable=True): then TEXT tokenizes the text.
        "prompt_tuning_init": "TEXT" if text else init, "prompt_tuning_init_text": text,
        "tokenizer_name_or_path": base if text else None, "tokenizer_kwargs": None,
    }
    return options, {"prompt_embeddings": prompt}


def _export_prefix_tuning(method: PeftMethod, base: str | None) -> Exported:
    shape = method.shape
    with torch.no_grad():
        prefix = method.encoder().detach().clone()  # (n, L * 2 * k); folds an unfolded P' and MLP on the fly
    options = {
        "num_virtual_tokens": int(prefix.shape[0]), **_prompt_learning_shape(method.model),
        "token_dim": shape.kv_dim, "num_attention_heads": shape.n_kv_heads,  # PEFT's values under GQA
        "encoder_hidden_size": shape.kv_dim, "prefix_projection": False, "init_weights": None,
    }
    return options, {"prompt_embeddings": prefix}


EXPORTERS: dict[str, Callable[[PeftMethod, str | None], Exported]] = {
    "lora": _export_lora,
    "ia3": _export_ia3,
    "prompt-tuning": _export_prompt_tuning,
    "prefix-tuning": _export_prefix_tuning,
}
