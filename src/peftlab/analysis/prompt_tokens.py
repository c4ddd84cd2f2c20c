"""What a soft prompt "says": the nearest vocabulary tokens of each virtual token (Lester et al. 2021, section 7).

For each trained prompt vector p_i (row i of the (n, d) prompt) and each row e_v of the input embedding matrix
(V, d), the cosine similarity cos(p_i, e_v) = p_i . e_v / (||p_i|| ||e_v||); the k largest are reported. When the
prompt was initialised from token ids (init=vocab or init=text; recorded in the adapter's ``method_info``), the
cosine to the initial token and that token's rank show how far training moved each vector away from its start.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from peftlab.analysis.adapters import read_prompt
from peftlab.analysis.output import plt, write_analysis
from peftlab.config import ModelConfig
from peftlab.methods.io import check_base
from peftlab.models.arch import input_embeddings


def cosine_matrix(prompt: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """cos(p_i, e_v) for every prompt row and vocabulary row: (n, d) x (V, d) -> (n, V), float32."""
    if prompt.shape[1] != embedding.shape[1]:
        raise ValueError(f"the prompt has width {prompt.shape[1]} but the embeddings have {embedding.shape[1]}: "
                         f"the adapter belongs to another base model")
    return F.normalize(prompt.float(), dim=1) @ F.normalize(embedding.float(), dim=1).T


def nearest_tokens(prompt: torch.Tensor, embedding: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest vocabulary ids of each prompt vector and their cosines, both (n, k), nearest first."""
    cos = cosine_matrix(prompt, embedding)
    values, ids = cos.topk(min(k, cos.shape[1]), dim=1)
    return ids, values


def _token_text(tokenizer: Any, token_id: int) -> dict[str, Any]:
    if tokenizer is None:
        return {"id": token_id}
    return {"id": token_id, "token": tokenizer.decode([token_id]),
            "piece": tokenizer.convert_ids_to_tokens(token_id)}


def prompt_token_report(prompt: torch.Tensor, model: nn.Module, tokenizer: Any = None, k: int = 5,
                        init_token_ids: list[int] | None = None) -> list[dict[str, Any]]:
    """One entry per virtual token: its norm, the ``k`` nearest tokens (id, text, cosine) and, given the ids the
    prompt was initialised from, the cosine to and rank of its initial token (rank 1 = still the nearest)."""
    embedding = input_embeddings(model).weight.detach().cpu()
    cos = cosine_matrix(prompt, embedding)  # (n, V)
    values, ids = cos.topk(min(k, cos.shape[1]), dim=1)
    entries = []
    for i in range(prompt.shape[0]):
        entry: dict[str, Any] = {"index": i, "norm": float(prompt[i].float().norm()),
                                 "nearest": [{**_token_text(tokenizer, int(t)), "cosine": float(c)}
                                             for t, c in zip(ids[i], values[i], strict=True)]}
        if init_token_ids is not None and i < len(init_token_ids):
            start = int(init_token_ids[i])
            entry["init"] = {**_token_text(tokenizer, start), "cosine": float(cos[i, start]),
                             "rank": int((cos[i] > cos[i, start]).sum()) + 1}
        entries.append(entry)
    return entries


def _label(token: dict[str, Any]) -> str:
    if "token" not in token:
        return str(token["id"])
    text = repr(token["token"])  # quoted, so leading spaces and newlines show: ' the', '\n'
    return text if len(text) <= 14 else text[:13] + "…"


def plot_prompt_tokens(data: dict[str, Any]) -> plt.Figure:
    """A table: rows = virtual tokens, columns = nearest 1..k; each cell shows the token, coloured by cosine."""
    entries = data["tokens"]
    k = len(entries[0]["nearest"])
    cos = np.array([[t["cosine"] for t in e["nearest"]] for e in entries])
    fig, ax = plt.subplots(figsize=(1.5 * k + 2.5, 0.32 * len(entries) + 1.4))
    image = ax.imshow(cos, cmap="viridis", vmin=min(0.0, float(cos.min())), vmax=1.0, aspect="auto")
    for i, entry in enumerate(entries):
        for j, token in enumerate(entry["nearest"]):
            ax.text(j, i, _label(token), ha="center", va="center", fontsize=7,
                    color="white" if token["cosine"] < 0.6 else "black")
    ax.set_xticks(range(k), [f"#{j + 1}" for j in range(k)], fontsize=8)
    ylabels = [f"p{e['index']}" + (f" (init {_label(e['init'])}, rank {e['init']['rank']})" if "init" in e else "")
               for e in entries]
    ax.set_yticks(range(len(entries)), ylabels, fontsize=7)
    fig.colorbar(image, ax=ax, label="cosine similarity", shrink=0.8)
    ax.set_title(f"Nearest vocabulary tokens of each virtual token: {data['adapter']}", fontsize=9)
    return fig


def prompt_tokens_for_model(folder: str | Path, model: nn.Module, tokenizer: Any = None, k: int = 5) -> dict:
    """The report for the prompt-tuning adapter in ``folder`` against ``model``'s input embeddings."""
    adapter, prompt = read_prompt(folder)
    init_ids = None
    if adapter.format == "peftlab":
        check_base(adapter.config, model, folder)
        init_ids = adapter.config.get("method_info", {}).get("init_token_ids")
    emb = input_embeddings(model).weight
    return {"adapter": str(folder), "base_model": adapter.base_model, "n_tokens": int(prompt.shape[0]), "top_k": k,
            "init_token_ids": init_ids, "embedding_norm_mean": float(emb.detach().float().norm(dim=1).mean()),
            "tokens": prompt_token_report(prompt, model, tokenizer, k, init_ids)}


def run_prompt_tokens(folder: str | Path, out: str | Path, stem: str = "prompt_tokens", model_name: str | None = None,
                      k: int = 5) -> Path:
    """Load the adapter's base model and tokenizer (or ``model_name``), write ``<out>/<stem>.json`` + ``.png``."""
    from peftlab.models.loading import load_model_and_tokenizer

    adapter, _ = read_prompt(folder)
    name = model_name or adapter.base_model
    if not name:
        raise ValueError(f"{folder}: the adapter config names no base model; pass --model")
    if k < 1:
        raise ValueError(f"--top-k must be >= 1, got {k}")
    print(f"[prompt-tokens] loading base model {name}", file=sys.stderr)
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name=name))
    data = prompt_tokens_for_model(folder, model, tokenizer, k)
    data["base_model"] = name
    return write_analysis(out, stem, "prompt-tokens", data, plot_prompt_tokens(data))
