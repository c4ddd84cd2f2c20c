"""Read saved adapters for analysis, without a model: LoRA factors (A, B, scaling) and soft prompts.

Two folder formats are accepted:

* peftlab's (``adapter_config.json`` with ``"format": "peftlab-adapter"`` + ``adapter.safetensors``), keys
  ``<module>.lora_A.<branch>`` (r, d_in) and ``<module>.lora_B.<branch>`` (d_out_branch, r); branch ``weight`` is
  the whole module, ``q``/``k``/``v`` an output slice of GPT-2's fused ``c_attn`` (see ``methods/lora/layer.py``);
  scaling ``alpha / r`` (``alpha / sqrt(r)`` with rslora);
* Hugging Face PEFT's (``adapter_config.json`` with ``peft_type`` + ``adapter_model.safetensors``), keys
  ``base_model.model.<module>.lora_A.weight``; scaling ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
  After removing the ``base_model.model.`` prefix these are peftlab's whole-module keys, so one parser reads both.

In both, the update of a branch in (out, in) orientation is ``delta W = scaling * B @ A``, also for GPT-2's
``Conv1D`` (whose stored weight is (in, out): the layer adds the transpose).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftlab.methods.io import CONFIG_NAME, FORMAT, WEIGHTS_NAME
from peftlab.methods.tensor_file import load_adapter_tensors

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PROMPT_KEY = "prompt_embeddings"  # the soft prompt's key in both formats (n_tokens, d)

_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.(?P<branch>[^.]+)$")
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.(?P<branch>[^.]+))?$")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class LoraFactors:
    """One LoRA branch: the update delta W = scaling * B @ A of one module (or output slice of one).

    Attributes:
        module: dotted module path, e.g. ``"model.layers.3.self_attn.q_proj"``.
        branch: ``"weight"`` for the whole module, or the slice name (``"q"``) of a fused GPT-2 ``c_attn``.
        A: (r, d_in).
        B: (d_out_branch, r).
        scaling: alpha / r (or alpha / sqrt(r)).
        magnitude: DoRA's magnitude per output feature (d_out_branch,), or None for plain LoRA.
    """

    module: str
    branch: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.module, self.branch

    @property
    def r(self) -> int:
        return int(self.A.shape[0])

    @property
    def layer(self) -> int | None:
        """The transformer block index (the first ``.<n>.`` in the module path), or None outside the blocks."""
        match = _LAYER_INDEX.search(f".{self.module}.")
        return int(match.group(1)) if match else None

    @property
    def kind(self) -> str:
        """The module kind shared across blocks, e.g. ``"q_proj"`` or ``"c_attn[q]"`` for a GPT-2 slice."""
        leaf = self.module.rsplit(".", 1)[-1]
        return leaf if self.branch == "weight" else f"{leaf}[{self.branch}]"

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in float64, (d_out_branch, d_in) (plain LoRA; DoRA also needs W, see amplification)."""
        return self.scaling * (self.B.double() @ self.A.double())


@dataclass
class SavedAdapter:
    """An adapter folder as read from disk.

    Attributes:
        folder: where it was read from.
        format: ``"peftlab"`` or ``"peft"``.
        method: peftlab method name (``"lora"``, ``"prompt-tuning"``, ...), or PEFT's ``peft_type`` lower-cased.
        base_model: the base model it was trained on (``ModelConfig.name`` for peftlab, PEFT's
            ``base_model_name_or_path``).
        config: the raw ``adapter_config.json``.
        weights: name -> tensor with PEFT's ``base_model.model.`` prefix removed.
    """

    folder: Path
    format: str
    method: str
    base_model: str | None
    config: dict[str, Any]
    weights: dict[str, torch.Tensor]


def read_saved_adapter(folder: str | Path) -> SavedAdapter:
    """Read a peftlab or PEFT adapter folder (safetensors only; no pickle).

    Raises:
        FileNotFoundError: no ``adapter_config.json`` or no weights file in ``folder``.
        ValueError: the config is neither format, or the weights are only a pickle (``adapter_model.bin``).
    """
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME} here; expected an adapter folder "
                                f"(peftlab train writes <out>/adapter; PEFT's save_pretrained also works)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if config.get("format") == FORMAT:
        return SavedAdapter(folder, "peftlab", config["method"], config.get("base_model"), config,
                            _read_weights(_weights_file(folder, WEIGHTS_NAME)))
    if "peft_type" in config:
        weights = _read_weights(_weights_file(folder, PEFT_WEIGHTS_NAME))
        weights = {k.removeprefix(PEFT_PREFIX): v for k, v in weights.items()}
        method = str(config["peft_type"]).lower().replace("_", "-")
        return SavedAdapter(folder, "peft", method, config.get("base_model_name_or_path"), config, weights)
    raise ValueError(f"{path}: neither a peftlab adapter (format={FORMAT!r}) nor a PEFT adapter (peft_type)")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    # The header is checked before any tensor is allocated (no model here, so no byte budget beyond the file's own).
    return load_adapter_tensors(path)[0]


def _weights_file(folder: Path, name: str) -> Path:
    path = folder / name
    if path.is_file():
        return path
    if (folder / "adapter_model.bin").is_file():
        raise ValueError(f"{folder}: only adapter_model.bin (a pickle) is here; peftlab reads safetensors only "
                         f"(save with safe_serialization=True)")
    raise FileNotFoundError(f"{folder}: no {name} next to {CONFIG_NAME}")


def lora_scaling(adapter: SavedAdapter) -> float:
    """The update multiplier recorded in the config: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    cfg = adapter.config
    if adapter.format == "peftlab":
        from peftlab.methods.lora.config import LoraConfig

        return LoraConfig(**cfg["method_config"]).scaling
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"{adapter.folder / CONFIG_NAME}: {key} is set; per-module ranks/alphas are not "
                             f"supported by the analysis (one r and lora_alpha for all modules)")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    return alpha / (r**0.5 if cfg.get("use_rslora") else r)


def read_lora(folder: str | Path) -> tuple[SavedAdapter, list[LoraFactors]]:
    """The LoRA branches of an adapter folder, in file order of their modules.

    Raises:
        ValueError: the adapter is not LoRA (the message names its method), or an A has no matching B.
    """
    adapter = read_saved_adapter(folder)
    if adapter.method != "lora":
        raise ValueError(f"{adapter.folder}: this analysis needs a LoRA adapter, but it holds method "
                         f"{adapter.method!r}")
    scaling = lora_scaling(adapter)
    factors: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    magnitudes: dict[tuple[str, str], torch.Tensor] = {}
    for name, tensor in adapter.weights.items():
        if match := _FACTOR_KEY.match(name):
            factors.setdefault((match["module"], match["branch"]), {})[match["which"]] = tensor
        elif match := _MAGNITUDE_KEY.match(name):
            magnitudes[(match["module"], match["branch"] or "weight")] = tensor
    out = []
    for (module, branch), pair in factors.items():
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise ValueError(f"{adapter.folder}: {module}.lora_{missing}.{branch} is missing from the adapter file")
        a, b = pair["A"], pair["B"]
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{adapter.folder}: {module} branch {branch}: lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)} disagree on r")
        out.append(LoraFactors(module, branch, a, b, scaling, magnitudes.get((module, branch))))
    if not out:
        raise ValueError(f"{adapter.folder}: no lora_A / lora_B weights in the adapter file")
    return adapter, out


def read_prompt(folder: str | Path) -> tuple[SavedAdapter, torch.Tensor]:
    """The soft prompt (n_tokens, d) of a prompt-tuning adapter (peftlab or PEFT ``PROMPT_TUNING``)."""
    adapter = read_saved_adapter(folder)
    if PROMPT_KEY not in adapter.weights:
        raise ValueError(f"{adapter.folder}: no {PROMPT_KEY!r} weight (method {adapter.method!r}); "
                         f"prompt-tokens needs a prompt-tuning adapter")
    prompt = adapter.weights[PROMPT_KEY]
    if prompt.dim() != 2:
        raise ValueError(f"{adapter.folder}: {PROMPT_KEY} has shape {tuple(prompt.shape)}, expected (n_tokens, d)")
    return adapter, prompt
