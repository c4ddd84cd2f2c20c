"""Options of LoHa (``method=loha``)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.options import MethodOptions, check, check_module_names, opt


@dataclass
class LohaConfig(MethodOptions):
    r: int = opt(8, "rank of each of the two low-rank factors (W1a W1b and W2a W2b, each d_out x r times r x d_in)")
    alpha: float = opt(8.0, "scaling numerator: the update is (alpha / r) (W1a W1b) * (W2a W2b) (PEFT's default 8)")
    target_modules: list[str] | str = opt(
        ["q", "v"],
        "layers to adapt: canonical q k v o gate up down, 'all-linear', module-name suffixes (q_proj, ...), or one "
        "regex string over full module names",
    )

    def check(self) -> None:
        check(self.r > 0, "method.r", f"must be an integer > 0, got {self.r!r}")
        check(self.alpha > 0, "method.alpha", f"must be a number > 0, got {self.alpha!r}")
        self.target_modules = check_module_names(self.target_modules, "method.target_modules")

    @property
    def scaling(self) -> float:
        """alpha / r."""
        return self.alpha / self.r
