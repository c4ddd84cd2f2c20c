"""Options of intrinsic-dimension subspace training (``method=intrinsic-dim``)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.config import ConfigError, check, check_choice, opt

PROJECTIONS = ("auto", "dense", "fastfood")

# "auto" picks the dense projection while the (D, d) matrix has at most this many entries (80 MB in float32).
DENSE_MAX_ENTRIES = 20_000_000


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class IntrinsicDimConfig:
    d: int = opt(1000, "intrinsic dimension: size of the trainable vector theta_d (the offset is P theta_d)")
    projection: str = opt(
        "auto",
        "random projection P (D x d): dense (Gaussian matrix, memory D*d) | fastfood (S H G Pi H B, memory O(D)) | "
        f"auto (dense while D*d <= {DENSE_MAX_ENTRIES:.0e}, else fastfood)",
    )
    target_modules: list[str] | str = opt(
        "all-linear",
        "weight matrices that move in the subspace (D = their total size): 'all-linear' (every linear layer of the "
        "blocks), canonical q k v o gate up down, module-name suffixes (c_attn, q_proj, ...), or one regex string",
    )
    said: bool = opt(
        False,
        "SAID (structure-aware): W_i = W0_i + lambda_i (P theta_d)_i with one trainable scale per weight matrix "
        "(init 1); trainable = d + number of matrices",
    )
    seed: int = opt(0, "seed of the random projection; saved with the adapter, which regenerates P from it")

    def __post_init__(self) -> None:
        check(_is_int(self.d) and self.d > 0, "method.d", f"must be an integer > 0, got {self.d!r}")
        check_choice(self.projection, "method.projection", PROJECTIONS)
        check(isinstance(self.said, bool), "method.said", f"must be true or false, got {self.said!r}")
        check(_is_int(self.seed) and self.seed >= 0, "method.seed", f"must be an integer >= 0, got {self.seed!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            check(bool(targets.strip()), "method.target_modules", "must not be empty")
        elif isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets):
            self.target_modules = list(targets)
        else:
            raise ConfigError(f"method.target_modules: expected 'all-linear', a non-empty list of names (e.g. [q, v]) "
                              f"or a regex string, got {targets!r}")
