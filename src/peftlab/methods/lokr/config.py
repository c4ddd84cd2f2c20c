"""Options of LoKr (``method=lokr``)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.options import MethodOptions, check, check_module_names, opt


@dataclass
class LokrConfig(MethodOptions):
    r: int = opt(8, "rank of the factored Kronecker factor(s): W2 is factored W2a W2b when r < max(its dims) / 2, "
                    "else trained in full (PEFT's rule), so the count is not monotone in r")
    alpha: float = opt(8.0, "scaling numerator: the update is (alpha / r) kron(W1, W2) (PEFT's default 8)")
    target_modules: list[str] | str = opt(
        ["q", "v"],
        "layers to adapt: canonical q k v o gate up down, 'all-linear', module-name suffixes (q_proj, ...), or one "
        "regex string over full module names",
    )
    decompose_factor: int = opt(-1, "factor of d_out = l k and d_in = m n: -1 (PEFT's default) picks the divisor pair "
                                    "nearest the square root; f > 0 picks (f, d / f) when f divides d")
    decompose_both: bool = opt(False, "also factor W1 as W1a W1b (rank r) when r < max(l, m) / 2")

    def check(self) -> None:
        check(self.r > 0, "method.r", f"must be an integer > 0, got {self.r!r}")
        check(self.alpha > 0, "method.alpha", f"must be a number > 0, got {self.alpha!r}")
        check(self.decompose_factor == -1 or self.decompose_factor > 0, "method.decompose_factor",
              f"must be -1 or an integer > 0, got {self.decompose_factor!r}")
        self.target_modules = check_module_names(self.target_modules, "method.target_modules")

    @property
    def scaling(self) -> float:
        """alpha / r."""
        return self.alpha / self.r
