"""Options of BitFit (``method=bitfit``)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.options import MethodOptions, check_choice, opt

BIAS_GROUPS = ("all", "attention", "mlp")


@dataclass
class BitFitConfig(MethodOptions):
    biases: str = opt(
        "all",
        "which biases train: all (every bias parameter, norms included, as in the paper) | attention (the q/k/v/o "
        "projections' biases) | mlp (the feed-forward projections' biases)",
    )

    def check(self) -> None:
        check_choice(self.biases, "method.biases", BIAS_GROUPS)
