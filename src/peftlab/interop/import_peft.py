"""Read a Hugging Face PEFT adapter folder (LoRA incl. rsLoRA/DoRA, IA3, prompt tuning, prefix tuning) as peftlab's.

PEFT options map to peftlab's method options; the weights need no conversion beyond dropping PEFT's
``base_model.model.`` key prefix (peftlab's keys for whole layers and prompts are PEFT's):

    LORA            r -> r, lora_alpha -> alpha, lora_dropout -> dropout, use_rslora -> rslora, use_dora -> use_dora,
                    target_modules -> target_modules (same rule: a name or dotted suffix per item, a regex string
                    matched in full, or "all-linear"). GPT-2 c_attn LoRAs stay whole-module LoRAs.
                    rank_pattern / alpha_pattern (per-module rank r_m and scaling s_m): peftlab has one rank R and
                    one scaling s, so every module is padded to R = max r_m with zero rows of A and zero columns of
                    B, and s_m / s is folded into B:  s [B_m s_m/s, 0] [A_m; 0] = s_m B_m A_m  (DoRA sees the same
                    W + s_m B_m A_m, so it is exact too).
    IA3             target_modules, feedforward_modules (PEFT matches those as plain suffixes among the targets;
                    with the model at hand they are rewritten to names peftlab resolves to the same layers)
    PROMPT_TUNING   num_virtual_tokens -> n_tokens, prompt_tuning_init RANDOM/SAMPLE_VOCAB -> init random/vocab
                    (TEXT -> random: the initialisation is irrelevant once the weights are loaded)
    PREFIX_TUNING   num_virtual_tokens -> n_tokens, reparametrize=false (PEFT's file holds the prefix P itself,
                    also when it was trained with prefix_projection)

An option that changes what the adapter computes and that peftlab lacks (``layers_to_transform``, ``exclude_modules``,
``bias``, ``modules_to_save``, a base-mutating ``init_lora_weights`` such as PiSSA, ...) is refused with its key.
Options that only matter to PEFT's own initialisation or bookkeeping are ignored. A PEFT folder has no peftlab
fingerprint: the base model is checked through the dimensions in the config and the shape of every tensor.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.config import ConfigError, ModelConfig
from peftlab.interop.peft_format import (
    METHODS_BY_PEFT_TYPE,
    PEFT_CONFIG_NAME,
    PEFT_FORMAT,
    PEFT_WEIGHTS_NAME,
    PeftFormatError,
    ensure_free,
    minimal_names,
    peft_list_match,
    peft_suffix_match,
    read_peft_config,
    read_peft_weights,
)
from peftlab.methods.base import PeftMethod, get_method
from peftlab.methods.io import AdapterMismatchError, save_adapter
from peftlab.methods.tensor_file import byte_budget
from peftlab.models.arch import arch_fingerprint, resolve_targets, transformer_blocks
from peftlab.models.loading import load_model_and_tokenizer

# Keys every PEFT config has that describe the file, not the adapter's computation.
COMMON_IGNORED = frozenset({"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                            "auto_mapping", "peft_version"})
# Per PEFT type: keys mapped to peftlab options or checked against the model, and keys that only steer PEFT's
# initialisation or runtime (ignored). Any other key must be unset (None, False, empty, "none").
MAPPED = {
    "LORA": {"r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora", "init_lora_weights",
             "rank_pattern", "alpha_pattern"},
    "IA3": {"target_modules", "feedforward_modules"},
    "PROMPT_TUNING": {"num_virtual_tokens", "prompt_tuning_init", "token_dim", "num_transformer_submodules",
                      "num_attention_heads", "num_layers"},
    "PREFIX_TUNING": {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                      "num_layers"},
}
IGNORED = {
    "LORA": {"fan_in_fan_out", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_core",
             "qalora_group_size", "runtime_config", "ensure_weight_tying"},
    "IA3": {"fan_in_fan_out", "init_ia3_weights"},
    "PROMPT_TUNING": {"prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"},
    "PREFIX_TUNING": {"encoder_hidden_size", "prefix_projection", "init_weights"},
}
# init_lora_weights values that only initialise A and B; the others (PiSSA, OLoRA, CorDA, LoftQ, MiCA, ...) change
# the base weights or the forward, so the adapter is not a plain LoRA on the unchanged base.
PLAIN_LORA_INITS = (True, False, "gaussian", "eva", "orthogonal")
PROMPT_INITS = {"RANDOM": "random", "SAMPLE_VOCAB": "vocab", "TEXT": "random"}


def _is_unset(value: Any) -> bool:
    return value is None or value is False or value in ("", "none") or (isinstance(value, (list, dict)) and not value)


def _check_keys(peft_type: str, config: dict[str, Any], where: Path) -> None:
    """Refuse options peftlab cannot honour, naming the key (task types other than a causal LM too)."""
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise PeftFormatError(f"{where}: task_type={config['task_type']!r} is not supported; peftlab adapts causal "
                              f"language models (task_type CAUSAL_LM or null)")
    known = COMMON_IGNORED | MAPPED[peft_type] | IGNORED[peft_type]
    for key, value in config.items():
        if key not in known and not _is_unset(value):
            raise PeftFormatError(
                f"{where}: PEFT option {key}={value!r} is not supported by peftlab's "
                f"{METHODS_BY_PEFT_TYPE[peft_type]}; supported options: {', '.join(sorted(MAPPED[peft_type]))} "
                f"(others must be unset)")


def _required(config: dict[str, Any], key: str, where: Path) -> Any:
    if config.get(key) is None:
        raise PeftFormatError(f"{where}: PEFT option {key!r} is missing or null")
    return config[key]


def _lora_options(config: dict[str, Any], where: Path) -> dict[str, Any]:
    init = config.get("init_lora_weights", True)
    if init not in PLAIN_LORA_INITS:
        raise PeftFormatError(
            f"{where}: init_lora_weights={init!r} is not supported: that initialisation changes the base weights or "
            f"the forward pass; convert the adapter with PEFT's save_pretrained(..., "
            f"path_initial_model_for_weight_conversion=...) first (supported: {PLAIN_LORA_INITS})")
    rank, scaling = _lora_rank_and_scaling(config, where)
    rslora = bool(config.get("use_rslora"))
    # alpha giving scaling s at rank R (PEFT's own lora_alpha when R = r, so a plain adapter keeps its numbers)
    alpha = config["lora_alpha"] if rank == config["r"] else scaling * (rank**0.5 if rslora else rank)
    return {"r": rank, "alpha": alpha, "dropout": config.get("lora_dropout") or 0.0,
            "target_modules": _required(config, "target_modules", where), "rslora": rslora,
            "use_dora": bool(config.get("use_dora"))}


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
    r, alpha = _required(config, "r", where), _required(config, "lora_alpha", where)
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


def _ia3_options(config: dict[str, Any], where: Path) -> dict[str, Any]:
    return {"target_modules": _required(config, "target_modules", where),
            "feedforward_modules": config.get("feedforward_modules")}


def _prompt_options(config: dict[str, Any], where: Path) -> dict[str, Any]:
    init = config.get("prompt_tuning_init") or "RANDOM"
    return {"n_tokens": _required(config, "num_virtual_tokens", where), "init": PROMPT_INITS.get(init, "random")}


def _prefix_options(config: dict[str, Any], where: Path) -> dict[str, Any]:
    return {"n_tokens": _required(config, "num_virtual_tokens", where), "reparametrize": False}


OPTIONS = {"LORA": _lora_options, "IA3": _ia3_options, "PROMPT_TUNING": _prompt_options,
           "PREFIX_TUNING": _prefix_options}


def peft_method_config(config: dict[str, Any], where: str | Path = PEFT_CONFIG_NAME) -> tuple[str, dict[str, Any]]:
    """peftlab's method name and options for a PEFT ``adapter_config.json`` (no model needed).

    Raises:
        PeftFormatError: an unknown ``peft_type``, an unsupported option (named), or an invalid value.
    """
    where = Path(where)
    peft_type = str(config.get("peft_type"))
    if peft_type not in OPTIONS:
        raise PeftFormatError(f"{where}: peft_type={peft_type!r} cannot be imported; importable PEFT types: "
                              f"{', '.join(OPTIONS)} (peftlab methods {', '.join(METHODS_BY_PEFT_TYPE.values())})")
    if config.get("num_transformer_submodules") not in (None, 1):
        raise PeftFormatError(f"{where}: num_transformer_submodules={config['num_transformer_submodules']} is an "
                              f"encoder-decoder prompt; peftlab adapts decoder-only models (1)")
    _check_keys(peft_type, config, where)
    method = METHODS_BY_PEFT_TYPE[peft_type]
    options = OPTIONS[peft_type](config, where)
    try:
        get_method(method).build_config(options)  # peftlab's own checks (r > 0, ...), reported with the file
    except ConfigError as exc:
        raise PeftFormatError(f"{where}: {exc}") from exc
    return method, options


def peft_adapter_config(folder: str | Path) -> dict[str, Any]:
    """What :func:`peftlab.methods.io.read_adapter_config` returns for a PEFT folder (no model needed).

    Keys: ``format`` ("peft"), ``method``, ``method_config``, ``base_model`` (PEFT's ``base_model_name_or_path``,
    may be None), ``base_fingerprint`` (None: PEFT records none) and ``peft_config`` (the file as read).
    """
    folder = Path(folder)
    config = read_peft_config(folder)
    method, options = peft_method_config(config, folder / PEFT_CONFIG_NAME)
    return {"format": PEFT_FORMAT, "method": method, "method_config": options,
            "base_model": config.get("base_model_name_or_path"), "base_fingerprint": None, "peft_config": config}


def _exact_feedforward(model: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
    """IA3 options whose ``feedforward_modules`` select, by peftlab's rule, the layers PEFT's rule selects."""
    items = options["feedforward_modules"]
    if items is None:
        return options
    targets = [t.name for t in resolve_targets(model, options["target_modules"], key="target_modules")]
    if isinstance(items, str):
        chosen = [t for t in targets if re.fullmatch(items, t)]
    else:
        chosen = [t for t in targets if any(peft_suffix_match(t, item) for item in items)]
    universe = [name for name, _ in model.named_modules() if name]
    return {**options, "feedforward_modules": minimal_names(chosen, universe, peft_list_match)}


def _check_dimensions(model: nn.Module, method: str, config: dict[str, Any], where: Path) -> None:
    """Prompt learning: PEFT's recorded dimensions against the model's, each mismatch named."""
    n_layers = len(transformer_blocks(model))
    expected: dict[str, int] = {"num_layers": n_layers}
    if method == "prompt-tuning":
        expected["token_dim"] = model.get_input_embeddings().embedding_dim
    diffs = [f"{key}: adapter {config.get(key)!r} vs model {value!r}" for key, value in expected.items()
             if config.get(key) is not None and config[key] != value]
    if diffs:
        raise AdapterMismatchError(f"PEFT adapter {where} was made for {config.get('base_model_name_or_path')!r}, "
                                   f"which differs from this base model: " + "; ".join(diffs))


def check_weights(method: PeftMethod, state: dict[str, torch.Tensor], where: Path, made_for: str | None) -> None:
    """Every tensor of the file against the applied method's parameters: missing, extra and mis-shaped keys named.

    Raises:
        AdapterMismatchError: the adapter does not fit (typically: made for another base model).
    """
    expected = {k: tuple(p.shape) for k, p in method.trainable_parameters().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    problems = []
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    shapes = [f"{k}: file {got[k]} vs model {expected[k]}" for k in sorted(set(got) & set(expected))
              if got[k] != expected[k]]
    if missing:
        problems.append(f"{len(missing)} weight(s) the model needs are not in {PEFT_WEIGHTS_NAME}, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} weight(s) in {PEFT_WEIGHTS_NAME} fit no adapted layer, e.g. {extra[:3]}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes[:3]))
    if problems:
        model_type = getattr(method.model.config, "model_type", "?")
        raise AdapterMismatchError(f"PEFT adapter {where} (made for {made_for!r}) does not fit this {model_type} "
                                   f"base model: " + "; ".join(problems))


def load_peft_adapter(model: nn.Module, folder: str | Path) -> tuple[PeftMethod, dict[str, Any]]:
    """Apply the PEFT folder's method to ``model`` and load its weights (the PEFT branch of ``load_adapter``).

    Returns:
        The method and the adapter config (as :func:`peft_adapter_config`, with the options actually applied).

    Raises:
        PeftFormatError: an unsupported PEFT type or option (named), or no safetensors file.
        AdapterMismatchError: the adapter was made for a base model of other dimensions (each difference named).
    """
    folder = Path(folder)
    record = peft_adapter_config(folder)
    method_name, options = record["method"], record["method_config"]
    made_for = record["base_model"]
    if method_name in ("prompt-tuning", "prefix-tuning"):
        _check_dimensions(model, method_name, record["peft_config"], folder / PEFT_CONFIG_NAME)
    try:
        if method_name == "ia3":
            options = _exact_feedforward(model, options)
        spec = get_method(method_name)
        method = spec.apply(model, spec.build_config(options))
    except ConfigError as exc:
        raise AdapterMismatchError(f"PEFT adapter {folder} (made for {made_for!r}) does not fit this base model: "
                                   f"{exc}") from exc
    # The header is checked against what the applied method can hold before any tensor is read.
    state, _ = read_peft_weights(folder, byte_budget(method.trainable_parameters()))
    if method_name == "lora":
        state = _lora_state(record["peft_config"], state, folder / PEFT_CONFIG_NAME)
    check_weights(method, state, folder, made_for)
    method.load_adapter_state_dict(state)
    return method, {**record, "method_config": dataclasses.asdict(method.config)}


def import_adapter(peft_dir: str | Path, out: str | Path, model_name: str | None = None) -> Path:
    """``peftlab import PEFT_DIR OUT``: convert a PEFT adapter folder into a peftlab adapter folder.

    The base model is loaded (``model_name``, default PEFT's ``base_model_name_or_path``) so the result records
    its fingerprint, like an adapter peftlab trained.

    Raises:
        PeftFormatError: no base model is known, or the folder cannot be converted (the key is named).
        AdapterMismatchError: the adapter does not fit the base model.
        OutputExistsError: ``out`` is not empty.
    """
    peft_dir = Path(peft_dir)
    out = ensure_free(out)
    record = peft_adapter_config(peft_dir)
    name = model_name or record["base_model"]
    if not name:
        raise PeftFormatError(f"{peft_dir / PEFT_CONFIG_NAME}: base_model_name_or_path is empty; pass the base model "
                              f"with --model (a hub id, a local folder, a .gguf file or smollm2-135m)")
    model, _ = load_model_and_tokenizer(ModelConfig(name=name))
    fingerprint = arch_fingerprint(model)
    method, config = load_peft_adapter(model, peft_dir)
    extra = {"imported_from": {"path": str(peft_dir.resolve()), "peft_config": config["peft_config"]}}
    return save_adapter(method, config["method"], out, name, fingerprint, extra=extra)
