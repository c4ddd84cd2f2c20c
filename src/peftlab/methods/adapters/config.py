"""Options of the bottleneck adapters (``method=adapter-houlsby | adapter-pfeiffer | adapter-parallel |
adapter-scaled-parallel``): one set of fields, with per-method defaults in small subclasses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftlab.options import ConfigError, MethodOptions, check, check_choice, opt

NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")
PLACEMENTS = ("ffn", "attn", "both")
DEFAULT_BOTTLENECK = 64


@dataclass
class AdapterConfig(MethodOptions):
    """Shared fields; the class attributes say how the method places its adapters.

    Attributes:
        METHOD: registered method name (used in error messages).
        PARALLEL: True: adapter(sub-layer input) is added to the sub-layer output (He et al.);
            False: adapter(sub-layer output) is added to that output (Houlsby / Pfeiffer).
        ALLOWED_PLACEMENTS: the placements this method accepts.
    """

    METHOD: ClassVar[str] = "adapter-parallel"
    PARALLEL: ClassVar[bool] = True
    ALLOWED_PLACEMENTS: ClassVar[tuple[str, ...]] = PLACEMENTS

    bottleneck_size: int | None = opt(
        None, f"bottleneck width b (down: d -> b, up: b -> d); default {DEFAULT_BOTTLENECK} unless reduction_factor "
              "is set (set at most one of the two)")
    reduction_factor: float | None = opt(None, "alternative to bottleneck_size: b = hidden_size // reduction_factor")
    non_linearity: str = opt("relu", "activation between down and up: relu | gelu | silu | tanh")
    scaling: float = opt(1.0, "multiplier s of the adapter output: s * up(act(down(h)))")
    placement: str = opt("ffn", "parallel adapters: next to the feed-forward (ffn), the attention (attn) or both")
    dropout: float = opt(0.0, "dropout on the bottleneck activations (after the non-linearity), in [0, 1)")

    def check(self) -> None:
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise ConfigError(
                f"method.bottleneck_size / method.reduction_factor: set one of the two, not both "
                f"(got bottleneck_size={self.bottleneck_size!r}, reduction_factor={self.reduction_factor!r})")
        if self.reduction_factor is None:
            if self.bottleneck_size is None:
                self.bottleneck_size = DEFAULT_BOTTLENECK
            check(self.bottleneck_size > 0, "method.bottleneck_size",
                  f"must be an integer > 0, got {self.bottleneck_size!r}")
        else:
            check(self.reduction_factor > 0, "method.reduction_factor",
                  f"must be a number > 0, got {self.reduction_factor!r}")
        check_choice(self.non_linearity, "method.non_linearity", NON_LINEARITIES)
        check(self.scaling > 0, "method.scaling", f"must be a number > 0, got {self.scaling!r}")
        check(0 <= self.dropout < 1, "method.dropout", f"must be in [0, 1), got {self.dropout!r}")
        if self.placement not in self.ALLOWED_PLACEMENTS:
            raise ConfigError(
                f"method.placement: {self.placement!r} is not one of {', '.join(map(repr, self.ALLOWED_PLACEMENTS))}"
                f" for {self.METHOD}; adapter-houlsby adapts attention and FFN (both), adapter-pfeiffer the FFN only,"
                f" adapter-parallel / adapter-scaled-parallel take placement {' | '.join(PLACEMENTS)}")

    def bottleneck(self, hidden_size: int) -> int:
        """The bottleneck width b for a model of width ``hidden_size`` (``hidden_size // reduction_factor``)."""
        if self.reduction_factor is None:
            return int(self.bottleneck_size)  # type: ignore[arg-type]  # set in check()
        size = int(hidden_size // self.reduction_factor)
        check(size > 0, "method.reduction_factor",
              f"hidden_size {hidden_size} // {self.reduction_factor!r} = {size}; the bottleneck must be > 0")
        return size

    @property
    def sublayers(self) -> tuple[str, ...]:
        """The adapted sub-layers of every block, in block order: ``("attn",)``, ``("ffn",)`` or both."""
        return ("attn", "ffn") if self.placement == "both" else (self.placement,)


@dataclass
class HoulsbyAdapterConfig(AdapterConfig):
    METHOD: ClassVar[str] = "adapter-houlsby"
    PARALLEL: ClassVar[bool] = False
    ALLOWED_PLACEMENTS: ClassVar[tuple[str, ...]] = ("both",)

    placement: str = opt("both", "fixed: sequential adapters after the attention output and after the FFN")


@dataclass
class PfeifferAdapterConfig(AdapterConfig):
    METHOD: ClassVar[str] = "adapter-pfeiffer"
    PARALLEL: ClassVar[bool] = False
    ALLOWED_PLACEMENTS: ClassVar[tuple[str, ...]] = ("ffn",)

    placement: str = opt("ffn", "fixed: one sequential adapter after the FFN")


@dataclass
class ParallelAdapterConfig(AdapterConfig):
    """``adapter-parallel``: the shared defaults (placement ffn, scaling 1)."""


@dataclass
class ScaledParallelAdapterConfig(AdapterConfig):
    METHOD: ClassVar[str] = "adapter-scaled-parallel"

    scaling: float = opt(4.0, "multiplier s of the adapter output (He et al.'s scaled PA uses 4)")
