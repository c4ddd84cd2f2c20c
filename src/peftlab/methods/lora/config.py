"""Options of LoRA (``method=lora``)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.config import ConfigError, check, opt


@dataclass
class LoraConfig:
    r: int = opt(8, "rank of the update B A (A: r x d_in, B: d_out x r)")
    alpha: float = opt(16.0, "scaling numerator: the update is (alpha / r) B A, or (alpha / sqrt(r)) B A with rslora")
    dropout: float = opt(0.0, "dropout on the LoRA branch's input only, in [0, 1)")
    target_modules: list[str] | str = opt(
        ["q", "v"],
        "layers to adapt: canonical q k v o gate up down, 'all-linear', module-name suffixes (c_attn, q_proj, ...), "
        "or one regex string over full module names",
    )
    rslora: bool = opt(False, "rank-stabilized scaling alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023)")
    use_dora: bool = opt(
        False,
        "DoRA (Liu et al. 2024): a trainable magnitude per output feature times the normalised direction W + s B A",
    )

    def __post_init__(self) -> None:
        check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0, "method.r",
              f"must be an integer > 0, got {self.r!r}")
        check(isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and self.alpha > 0,
              "method.alpha", f"must be a number > 0, got {self.alpha!r}")
        check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "method.dropout",
              f"must be in [0, 1), got {self.dropout!r}")
        check(isinstance(self.rslora, bool), "method.rslora", f"must be true or false, got {self.rslora!r}")
        check(isinstance(self.use_dora, bool), "method.use_dora", f"must be true or false, got {self.use_dora!r}")
        targets = self.target_modules
        names_ok = isinstance(targets, (list, tuple)) and all(isinstance(t, str) and t for t in targets)
        if isinstance(targets, str):
            check(bool(targets.strip()), "method.target_modules", "must not be empty")
        elif not names_ok or not targets:
            raise ConfigError(
                f"method.target_modules: expected a non-empty list of names (e.g. [q, v]) or a regex string, "
                f"got {targets!r}"
            )
        else:
            self.target_modules = list(targets)

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rslora."""
        return self.alpha / (self.r**0.5 if self.rslora else self.r)
