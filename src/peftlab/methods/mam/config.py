"""Options of the MAM adapter (``method=mam``): its two parts' options under their own names, passed through to
prefix tuning (:class:`PrefixTuningConfig`) and the scaled parallel FFN adapter (:class:`ScaledParallelAdapterConfig`),
with the same help and checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from peftlab.methods.adapters.config import ScaledParallelAdapterConfig
from peftlab.methods.prefix_tuning.config import PrefixTuningConfig
from peftlab.options import MethodOptions, opt

PREFIX_OPTIONS = ("n_tokens", "reparametrize", "hidden_size", "drop_mlp_after_training")
ADAPTER_OPTIONS = ("bottleneck_size", "scaling", "non_linearity", "dropout")


def part_option(part: type, name: str, default: Any = dataclasses.MISSING, note: str = "") -> Any:
    """A field declared as the part's field ``name`` is (same help, plus ``note``), with its default unless given."""
    field = next(f for f in dataclasses.fields(part) if f.name == name)
    return opt(field.default if default is dataclasses.MISSING else default, field.metadata["help"] + note)


@dataclass
class MamConfig(MethodOptions):
    # He et al.'s MAM: 30 prefix positions, a scaled parallel FFN adapter with s = 4 (bottleneck 512 on the
    # 1024-wide BART-large; here peftlab's adapter default 64, about d / 9 on SmolLM2-135M).
    n_tokens: int = part_option(PrefixTuningConfig, "n_tokens", 30, " (prefix part; He et al.'s MAM: 30)")
    reparametrize: bool = part_option(PrefixTuningConfig, "reparametrize", note=" (prefix part)")
    hidden_size: int = part_option(PrefixTuningConfig, "hidden_size", note=" (prefix part)")
    drop_mlp_after_training: bool = part_option(PrefixTuningConfig, "drop_mlp_after_training", note=" (prefix part)")
    bottleneck_size: int = part_option(ScaledParallelAdapterConfig, "bottleneck_size", 64,
                                       " (FFN adapter part; He et al. use 512 on 1024-wide BART-large)")
    scaling: float = part_option(ScaledParallelAdapterConfig, "scaling", note=" (FFN adapter part)")
    non_linearity: str = part_option(ScaledParallelAdapterConfig, "non_linearity", note=" (FFN adapter part)")
    dropout: float = part_option(ScaledParallelAdapterConfig, "dropout", note=" (FFN adapter part)")

    def check(self) -> None:
        """The parts check their own options (errors name ``method.<option>``, the same key as here)."""
        self.prefix_config()
        self.adapter_config()

    def prefix_config(self) -> PrefixTuningConfig:
        """The prefix-tuning part's options."""
        return PrefixTuningConfig(**{k: getattr(self, k) for k in PREFIX_OPTIONS})

    def adapter_config(self) -> ScaledParallelAdapterConfig:
        """The FFN adapter part's options (placement ffn, as in MAM)."""
        return ScaledParallelAdapterConfig(**{k: getattr(self, k) for k in ADAPTER_OPTIONS}, placement="ffn")
