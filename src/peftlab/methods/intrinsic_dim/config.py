"""Options of intrinsic-dimension subspace training (``method=intrinsic-dim``)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.options import MethodOptions, check, check_choice, check_module_names, opt

PROJECTIONS = ("auto", "dense", "fastfood")

# "auto" picks the dense projection while the (D, d) matrix has at most this many entries (80 MB in float32).
DENSE_MAX_ENTRIES = 20_000_000


@dataclass
class IntrinsicDimConfig(MethodOptions):
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

    def check(self) -> None:
        check(self.d > 0, "method.d", f"must be an integer > 0, got {self.d!r}")
        check_choice(self.projection, "method.projection", PROJECTIONS)
        check(self.seed >= 0, "method.seed", f"must be an integer >= 0, got {self.seed!r}")
        self.target_modules = check_module_names(self.target_modules, "method.target_modules")
