"""A model's parameters and linear layers from its Hugging Face config alone, without building the model.

Used to count what a PEFT method would train before loading any weights (``peftlab methods --budget``). The
layouts mirror transformers 5's ``GPT2LMHeadModel`` and the Llama-family ``*ForCausalLM`` classes (Llama, SmolLM2,
Mistral, Qwen2, Qwen3): the same parameter names, shapes and order as ``model.named_parameters()`` (a tied head
appears once, as the input embedding), which tests/test_budget.py checks against the real models.

* GPT-2: ``transformer.wte`` (V, d), ``wpe`` (n_positions, d); per block LayerNorms ``ln_1``/``ln_2`` (weight and
  bias, d each), ``Conv1D`` layers stored (in, out) with biases: ``attn.c_attn`` d -> 3d (q | k | v),
  ``attn.c_proj`` d -> d, ``mlp.c_fc`` d -> inner, ``mlp.c_proj`` inner -> d; final ``ln_f``; ``lm_head`` d -> V
  without bias (tied unless ``tie_word_embeddings`` is false).
* Llama family: ``model.embed_tokens`` (V, d); per block ``self_attn.{q,k,v,o}_proj`` (q: d -> H hd, k/v:
  d -> H_kv hd, o: H hd -> d), ``mlp.{gate,up,down}_proj`` (d -> I, d -> I, I -> d), RMSNorms (weight only)
  ``input_layernorm``/``post_attention_layernorm``; final ``model.norm``; ``lm_head``. Biases: Llama q/k/v/o by
  ``attention_bias`` and the MLP by ``mlp_bias``; Qwen2 always on q/k/v; Qwen3 q/k/v/o by ``attention_bias`` and
  per-head RMSNorms ``q_norm``/``k_norm`` (hd); Mistral none.

Target names resolve with the one resolver of :mod:`peftlab.models.targets` (:func:`resolve_target_shapes`), as
on a built model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftlab.config import ConfigError
from peftlab.models.targets import FUSED_QKV_PARTS, OutputWidth, resolve

# model_type -> module-naming family of :data:`peftlab.models.arch.FAMILIES`.
SHAPE_FAMILIES: dict[str, str] = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama",
                                  "qwen3": "llama"}
HEAD_NAME = "lm_head"


@dataclass(frozen=True)
class LinearShape:
    """One linear layer: its module path and (in_features, out_features) whatever the storage layout."""

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class TargetShape(OutputWidth):
    """A resolved target without its module: the counterpart of :class:`peftlab.models.arch.TargetModule`."""

    name: str
    in_features: int
    out_features: int
    part: str | None = None
    out_slice: tuple[int, int] | None = None


@dataclass(frozen=True)
class ModelShape:
    """What counting needs to know about a causal LM, derived from its config by :func:`model_shape`.

    Attributes:
        model_type: ``config.model_type``.
        family: ``"gpt2"`` or ``"llama"`` (the naming family of :data:`peftlab.models.arch.FAMILIES`).
        hidden_size: d (the embedding width).
        num_layers: L, the number of transformer blocks.
        num_heads: query heads H.
        num_kv_heads: key/value heads (H without grouped-query attention).
        head_dim: hd, per-head width.
        intermediate_size: the feed-forward width (GPT-2: ``n_inner`` or 4 d).
        vocab_size: V.
        max_positions: the longest sequence the position embeddings cover.
        tied: the head's weight is the input embedding matrix.
        block_prefix: module path of the block list (``"transformer.h"``, ``"model.layers"``).
        final_norm_prefix: module path of the norm after the last block (``"transformer.ln_f"``, ``"model.norm"``).
        params: (name, shape) of every parameter in ``named_parameters()`` order; a tied head appears once.
        linears: every linear layer in module order (``lm_head`` last).
    """

    model_type: str
    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    tied: bool
    block_prefix: str
    final_norm_prefix: str
    params: tuple[tuple[str, tuple[int, ...]], ...]
    linears: tuple[LinearShape, ...]

    @property
    def total_params(self) -> int:
        """Every parameter of the model (a tied matrix once), as ``sum(p.numel() for p in model.parameters())``."""
        return sum(_numel(shape) for _, shape in self.params)

    def params_under(self, prefix: str) -> int:
        """Parameters of the module at ``prefix`` (e.g. ``"model.layers.3"``) and its children."""
        return sum(_numel(shape) for name, shape in self.params if name.startswith(prefix + "."))

    def block_params(self, index: int) -> int:
        """Parameters of transformer block ``index`` (0-based)."""
        return self.params_under(f"{self.block_prefix}.{index}")

    @property
    def head_params(self) -> int:
        """The output head's weight (V, d); neither family has a head bias."""
        return self.vocab_size * self.hidden_size

    @property
    def kv_dim(self) -> int:
        """Width of one layer's keys (or values) per position: n_kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    def bias_names(self) -> list[str]:
        """Names of every parameter a module owns as ``bias`` (linear layers and LayerNorms), in model order."""
        return [name for name, _ in self.params if name.rsplit(".", 1)[-1] == "bias"]

    def linear(self, name: str) -> LinearShape:
        """The linear layer at module path ``name``."""
        for layer in self.linears:
            if layer.name == name:
                return layer
        raise KeyError(f"{name!r} is not a linear layer of this {self.model_type} model")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class _Layout:
    """Collects parameters and linear layers in model order while a family's layout is written out."""

    def __init__(self) -> None:
        self.params: list[tuple[str, tuple[int, ...]]] = []
        self.linears: list[LinearShape] = []

    def param(self, name: str, *shape: int) -> None:
        self.params.append((name, tuple(shape)))

    def linear(self, name: str, d_in: int, d_out: int, bias: bool, conv1d: bool = False) -> None:
        # Conv1D stores its weight (in, out); nn.Linear (out, in).
        self.param(f"{name}.weight", *((d_in, d_out) if conv1d else (d_out, d_in)))
        if bias:
            self.param(f"{name}.bias", d_out)
        self.linears.append(LinearShape(name, d_in, d_out))


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_shape(config: Any) -> ModelShape:
    """The :class:`ModelShape` of the causal LM that ``config`` (a transformers ``PretrainedConfig``) describes.

    Raises:
        ConfigError: the model type has no known layout (the message lists the known ones), or the config asks
            for parts the layouts do not cover (GPT-2 cross-attention).
    """
    cfg = _text_config(config)
    model_type = str(getattr(cfg, "model_type", ""))
    if model_type not in SHAPE_FAMILIES:
        raise ConfigError(f"model: counting parameters from the config needs a known layout; model_type "
                          f"{model_type!r} is not one of {', '.join(sorted(SHAPE_FAMILIES))}")
    heads = int(cfg.num_attention_heads)
    d = int(cfg.hidden_size)
    dims = {"hidden_size": d, "num_layers": int(cfg.num_hidden_layers), "num_heads": heads,
            "num_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
            # as prefix tuning's kv_shape and the Llama attention: config.head_dim, else d / H
            "head_dim": int(getattr(cfg, "head_dim", None) or d // heads),
            "vocab_size": int(cfg.vocab_size), "tied": bool(getattr(cfg, "tie_word_embeddings", False))}
    family = SHAPE_FAMILIES[model_type]
    if family == "gpt2":
        if getattr(cfg, "add_cross_attention", False):
            raise ConfigError("model: GPT-2 with add_cross_attention is not a decoder-only LM; no layout for it")
        inter = int(getattr(cfg, "n_inner", None) or 4 * d)
        layout = _gpt2_layout(cfg, dims, inter)
        prefixes = ("transformer.h", "transformer.ln_f")
        positions = int(cfg.n_positions)
    else:
        inter = int(cfg.intermediate_size)
        layout = _llama_layout(cfg, model_type, dims, inter)
        prefixes = ("model.layers", "model.norm")
        positions = int(cfg.max_position_embeddings)
    return ModelShape(model_type=model_type, family=family, intermediate_size=inter, max_positions=positions,
                      block_prefix=prefixes[0], final_norm_prefix=prefixes[1], params=tuple(layout.params),
                      linears=tuple(layout.linears), **dims)


def _gpt2_layout(cfg: Any, dims: dict[str, Any], inter: int) -> _Layout:
    d, vocab = dims["hidden_size"], dims["vocab_size"]
    out = _Layout()
    out.param("transformer.wte.weight", vocab, d)
    out.param("transformer.wpe.weight", int(cfg.n_positions), d)
    for i in range(dims["num_layers"]):
        p = f"transformer.h.{i}"
        out.param(f"{p}.ln_1.weight", d)
        out.param(f"{p}.ln_1.bias", d)
        out.linear(f"{p}.attn.c_attn", d, FUSED_QKV_PARTS * d, bias=True, conv1d=True)
        out.linear(f"{p}.attn.c_proj", d, d, bias=True, conv1d=True)
        out.param(f"{p}.ln_2.weight", d)
        out.param(f"{p}.ln_2.bias", d)
        out.linear(f"{p}.mlp.c_fc", d, inter, bias=True, conv1d=True)
        out.linear(f"{p}.mlp.c_proj", inter, d, bias=True, conv1d=True)
    out.param("transformer.ln_f.weight", d)
    out.param("transformer.ln_f.bias", d)
    _head(out, dims)
    return out


def _llama_layout(cfg: Any, model_type: str, dims: dict[str, Any], inter: int) -> _Layout:
    d, hd = dims["hidden_size"], dims["head_dim"]
    q_out, kv_out = dims["num_heads"] * hd, dims["num_kv_heads"] * hd
    attention_bias = bool(getattr(cfg, "attention_bias", False))
    qkv_bias = {"qwen2": True, "mistral": False}.get(model_type, attention_bias)
    o_bias = {"qwen2": False, "mistral": False}.get(model_type, attention_bias)
    mlp_bias = model_type == "llama" and bool(getattr(cfg, "mlp_bias", False))
    out = _Layout()
    out.param("model.embed_tokens.weight", dims["vocab_size"], d)
    for i in range(dims["num_layers"]):
        p = f"model.layers.{i}"
        out.linear(f"{p}.self_attn.q_proj", d, q_out, qkv_bias)
        out.linear(f"{p}.self_attn.k_proj", d, kv_out, qkv_bias)
        out.linear(f"{p}.self_attn.v_proj", d, kv_out, qkv_bias)
        out.linear(f"{p}.self_attn.o_proj", q_out, d, o_bias)
        if model_type == "qwen3":  # per-head RMSNorms on queries and keys
            out.param(f"{p}.self_attn.q_norm.weight", hd)
            out.param(f"{p}.self_attn.k_norm.weight", hd)
        out.linear(f"{p}.mlp.gate_proj", d, inter, mlp_bias)
        out.linear(f"{p}.mlp.up_proj", d, inter, mlp_bias)
        out.linear(f"{p}.mlp.down_proj", inter, d, mlp_bias)
        out.param(f"{p}.input_layernorm.weight", d)
        out.param(f"{p}.post_attention_layernorm.weight", d)
    out.param("model.norm.weight", d)
    _head(out, dims)
    return out


def _head(out: _Layout, dims: dict[str, Any]) -> None:
    """lm_head d -> V without bias; its weight is a parameter of its own only when untied."""
    d, vocab = dims["hidden_size"], dims["vocab_size"]
    if dims["tied"]:
        out.linears.append(LinearShape(HEAD_NAME, d, vocab))
    else:
        out.linear(HEAD_NAME, d, vocab, bias=False)


def resolve_target_shapes(shape: ModelShape, targets: list[str] | str, *,
                          key: str = "target_modules") -> list[TargetShape]:
    """The linear layers (or GPT-2 q/k/v output slices) that ``targets`` names, in model order.

    The same resolver as :func:`peftlab.models.arch.resolve_targets` (:func:`peftlab.models.targets.resolve`), on
    the config's layout.

    Raises:
        ConfigError: an item matches nothing, the list is empty, or a module is targeted both whole and as slices.
    """
    prefixes = [f"{shape.block_prefix}.{i}" for i in range(shape.num_layers)]
    found = resolve(shape.linears, targets, key=key, model_type=shape.model_type, family=shape.family,
                    block_prefixes=prefixes)
    return [TargetShape(lin.name, lin.in_features, lin.out_features, part, out_slice)
            for lin, part, out_slice in found]
