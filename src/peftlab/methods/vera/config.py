"""Options of VeRA (``method=vera``)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.options import MethodOptions, check, check_module_names, opt


@dataclass
class VeraConfig(MethodOptions):
    r: int = opt(256, "rank of the shared frozen random projections A (r x d_in) and B (d_out x r); VeRA trains only "
                      "r + d_out numbers per layer, so its ranks are far larger than LoRA's (PEFT's default 256)")
    target_modules: list[str] | str = opt(
        ["q", "v"],
        "layers to adapt: canonical q k v o gate up down, 'all-linear', module-name suffixes (c_attn, q_proj, ...), "
        "or one regex string over full module names",
    )
    d_initial: float = opt(0.1, "initial value of every entry of the scaling vector d (the paper's Table 6c: <= 0.1)")
    dropout: float = opt(0.0, "dropout on the VeRA branch's input only, in [0, 1)")
    projection_prng_key: int = opt(0, "seed of the shared random projections (PEFT's projection_prng_key)")
    save_projection: bool = opt(
        True, "save the shared projections A and B with the adapter (PEFT's default) instead of recomputing them "
              "from projection_prng_key on loading")

    def check(self) -> None:
        check(self.r > 0, "method.r", f"must be an integer > 0, got {self.r!r}")
        check(0 <= self.dropout < 1, "method.dropout", f"must be in [0, 1), got {self.dropout!r}")
        check(self.projection_prng_key >= 0, "method.projection_prng_key",
              f"must be an integer >= 0, got {self.projection_prng_key!r}")
        self.target_modules = check_module_names(self.target_modules, "method.target_modules")
