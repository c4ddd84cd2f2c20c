"""Apply intrinsic-dimension training: every target weight becomes W0 + (its block of) P theta_d.

    theta_D = theta_0 + P theta_d                   P: (D, d) fixed random, theta_d: (d,) trainable, init 0
    SAID:     theta_D^i = theta_0^i + lambda_i P_i theta_d   one trainable lambda_i (init 1) per weight matrix i

Each target module's ``weight`` is re-parametrized with ``torch.nn.utils.parametrize``: the frozen W0 stays the
module's only copy of the weights (``parametrizations.weight.original``) and every forward computes
W = W0 + offset, so gradients reach theta_d (and lambda) only. A "matrix" i is one resolved target: a whole layer,
or one q/k/v output slice of GPT-2's fused ``c_attn`` (its offset fills only those output columns).
Trainable count = d (+ the number of matrices with SAID). The adapter is theta_d (+ lambda); P is regenerated from
``method.seed`` (saved in the adapter config) and the resolved targets, so a fresh apply + load reproduces the model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from peftlab.methods.base import PeftMethod, freeze_all
from peftlab.methods.intrinsic_dim.config import DENSE_MAX_ENTRIES, IntrinsicDimConfig
from peftlab.methods.intrinsic_dim.projection import Projection, build_projections, resolve_projection
from peftlab.models.arch import TargetModule, input_embeddings, resolve_targets

THETA_KEY = "theta_d"
LAMBDA_KEY = "said_lambda"


@dataclass(frozen=True)
class MatrixPart:
    """Where matrix i's block of P theta_d goes in its module's stored weight.

    Attributes:
        index: i, the matrix's position among all targets (its row block of P and its SAID scale).
        shape: the block reshaped like the stored weight: (out, in) for ``nn.Linear``, (in, out) for ``Conv1D``.
        out_slice: (start, stop) output columns for a q/k/v slice of a fused layer; None for the whole weight.
    """

    index: int
    shape: tuple[int, int]
    out_slice: tuple[int, int] | None


class SubspaceOffset(nn.Module):
    """The parametrization of one module's weight: W0 -> W0 + sum over its parts of lambda_i * P_i theta_d."""

    def __init__(self, theta: nn.Parameter, said_lambda: nn.Parameter | None, projections: list[Projection],
                 parts: list[MatrixPart], fan_in_fan_out: bool) -> None:
        super().__init__()
        self.theta = theta  # (d,), shared by every module's parametrization (one parameter, counted once)
        self.said_lambda = said_lambda  # (n_matrices,) or None
        self.projections = nn.ModuleList(projections)
        self.parts = parts
        self.out_dim = 1 if fan_in_fan_out else 0  # output columns: Conv1D (in, out), nn.Linear (out, in)

    def offset(self, weight: torch.Tensor) -> torch.Tensor:
        """The offset in ``weight``'s layout and shape, in theta_d's dtype (float32)."""
        pieces = []
        for projection, part in zip(self.projections, self.parts, strict=True):
            block = projection(self.theta)  # (D_i,)
            if self.said_lambda is not None:
                block = block * self.said_lambda[part.index]
            pieces.append(block.view(part.shape))
        if self.parts[0].out_slice is None:
            return pieces[0]
        out = torch.zeros(weight.shape, dtype=self.theta.dtype, device=weight.device)
        for piece, part in zip(pieces, self.parts, strict=True):
            start, stop = part.out_slice  # type: ignore[misc]
            out.narrow(self.out_dim, start, stop - start).copy_(piece)  # autograd records the slice copy
        return out

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.offset(weight).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"matrices={[p.index for p in self.parts]}"


class IntrinsicDimMethod(PeftMethod):
    """Intrinsic-dimension training applied to one model; ``offsets`` maps module path -> its parametrization."""

    def __init__(self, model: nn.Module, config: IntrinsicDimConfig, offsets: dict[str, SubspaceOffset],
                 projection: str, total: int, tied: list[str]) -> None:
        self.model = model
        self.config = config
        self.offsets = offsets
        self.projection = projection  # "dense" or "fastfood" ("auto" resolved)
        self.total = total  # D
        self.n_matrices = sum(len(o.parts) for o in offsets.values())
        self.merged = False
        self._tied = tied  # targets whose weight is also the input embedding (merging would change the inputs)
        first = next(iter(offsets.values()))
        self.theta = first.theta
        self.said_lambda = first.said_lambda

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """``theta_d`` (d,) and, with SAID, ``said_lambda`` (n_matrices,)."""
        params = {THETA_KEY: self.theta}
        if self.said_lambda is not None:
            params[LAMBDA_KEY] = self.said_lambda
        return params

    @property
    def mergeable(self) -> bool:
        """False when a target shares its weight with the input embeddings (a tied LM head)."""
        return not self._tied

    @torch.no_grad()
    def merge(self) -> None:
        """Write W0 + offset into each target weight (in place) and remove the parametrizations."""
        if self.merged:
            return
        if not self.mergeable:
            warnings.warn(f"intrinsic-dim not merged: {self._tied} share their weight with the input embeddings",
                          stacklevel=2)
            return
        for name, offset in self.offsets.items():
            module = self.model.get_submodule(name)
            weight = module.parametrizations.weight.original  # W0, the module's own Parameter
            delta = offset.offset(weight).to(weight.dtype)
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)  # weight is W0 again
            weight.add_(delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the offset again (exact up to rounding) and restore the parametrizations."""
        if not self.merged:
            return
        for name, offset in self.offsets.items():
            module = self.model.get_submodule(name)
            module.weight.sub_(offset.offset(module.weight).to(module.weight.dtype))
            parametrize.register_parametrization(module, "weight", offset)
        self.merged = False

    def describe(self) -> dict[str, Any]:
        """d, the resolved projection, D, the number of matrices, SAID, the seed and the targeted layer kinds."""
        kinds = {name.rsplit(".", 1)[-1] + ("" if o.parts[0].out_slice is None else f"[{len(o.parts)} slices]")
                 for name, o in self.offsets.items()}
        return {"d": self.config.d, "projection": self.projection, "D": self.total, "n_matrices": self.n_matrices,
                "said": self.config.said, "seed": self.config.seed, "targets": sorted(kinds)}


def _part(target: TargetModule, index: int) -> MatrixPart:
    rows, cols = target.out_size, target.in_features
    shape = (cols, rows) if target.fan_in_fan_out else (rows, cols)
    return MatrixPart(index, shape, target.out_slice)


def apply_intrinsic_dim(model: nn.Module, config: IntrinsicDimConfig) -> IntrinsicDimMethod:
    """Freeze ``model`` and re-parametrize every target weight as W0 + P theta_d (in place).

    Args:
        model: a GPT-2 or Llama-family causal LM.
        config: the intrinsic-dimension options.

    Returns:
        The :class:`IntrinsicDimMethod`; the model's outputs equal the base model's (theta_d = 0).

    Raises:
        ConfigError: ``method.target_modules`` matches nothing (the message lists the valid names).
        ValueError: the method is already applied to ``model``.
    """
    if any(isinstance(m, SubspaceOffset) for m in model.modules()):
        raise ValueError("intrinsic-dim is already applied to this model; apply it to a fresh base model")
    freeze_all(model)
    targets = resolve_targets(model, config.target_modules, key="method.target_modules")
    sizes = [t.in_features * t.out_size for t in targets]  # D_i
    kind = resolve_projection(config.projection, sum(sizes), config.d, DENSE_MAX_ENTRIES)
    projections = build_projections(kind, sizes, config.d, config.seed)
    device = targets[0].module.weight.device
    theta = nn.Parameter(torch.zeros(config.d, device=device))  # init 0: the model starts as the base model
    said_lambda = nn.Parameter(torch.ones(len(targets), device=device)) if config.said else None
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(targets):
        groups.setdefault(t.name, []).append(i)
    emb_weight = input_embeddings(model).weight
    offsets: dict[str, SubspaceOffset] = {}
    tied: list[str] = []
    for name, indices in groups.items():
        first = targets[indices[0]]
        if first.module.weight is emb_weight:
            tied.append(name)
        blocks = [projections[i].to(first.module.weight.device) for i in indices]
        offset = SubspaceOffset(theta, said_lambda, blocks, [_part(targets[i], i) for i in indices],
                                first.fan_in_fan_out)
        parametrize.register_parametrization(first.module, "weight", offset)
        offsets[name] = offset
    return IntrinsicDimMethod(model, config, offsets, kind, sum(sizes), tied)
