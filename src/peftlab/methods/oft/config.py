"""Options of OFT (``method=oft``), named and defaulted as Hugging Face PEFT 0.21.2's ``OFTConfig``."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.options import ConfigError, MethodOptions, check, check_module_names, opt


@dataclass
class OftConfig(MethodOptions):
    r: int = opt(0, "number of diagonal blocks per layer (PEFT's r; block size = d_in / r); set r or oft_block_size, "
                    "the other 0")
    oft_block_size: int = opt(32, "size b of each orthogonal block (d_in / b blocks per layer); set oft_block_size "
                                  "or r, the other 0. A b (or r) that does not divide a layer's d_in becomes the "
                                  "nearest divisor, with a warning, as in PEFT")
    target_modules: list[str] | str = opt(
        ["q", "v"],
        "layers to adapt: canonical q k v o gate up down, 'all-linear', module-name suffixes (q_proj, ...), or one "
        "regex string over full module names",
    )
    block_share: bool = opt(False, "one block shared by all diagonal positions of a layer (b(b-1)/2 weights)")
    coft: bool = opt(False, "constrained OFT: before every use, project each Q to ||Q||_F <= eps / sqrt(n_blocks)")
    eps: float = opt(6e-5, "COFT's radius (coft=true only)")
    use_cayley_neumann: bool = opt(True, "R from a truncated Neumann series of the Cayley transform (PEFT's default) "
                                         "instead of the exact (I - Q)(I + Q)^-1")
    num_cayley_neumann_terms: int = opt(5, "terms of the Neumann series (use_cayley_neumann=true)")
    module_dropout: float = opt(0.0, "while training, replace this fraction of each layer's blocks by the identity "
                                     "(PEFT's multiplicative dropout), in [0, 1)")

    def check(self) -> None:
        check(self.r >= 0, "method.r", f"must be an integer >= 0, got {self.r!r}")
        check(self.oft_block_size == 0 or self.oft_block_size >= 2, "method.oft_block_size",
              f"must be 0 or an integer >= 2 (a 1 x 1 rotation has no weights), got {self.oft_block_size!r}")
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(f"method.r / method.oft_block_size: set exactly one of the two, the other 0 (r x "
                              f"oft_block_size = d_in), got r={self.r!r}, oft_block_size={self.oft_block_size!r}")
        check(self.eps > 0, "method.eps", f"must be a number > 0, got {self.eps!r}")
        check(self.num_cayley_neumann_terms >= 1, "method.num_cayley_neumann_terms",
              f"must be an integer >= 1, got {self.num_cayley_neumann_terms!r}")
        check(0 <= self.module_dropout < 1, "method.module_dropout", f"must be in [0, 1), got {self.module_dropout!r}")
        self.target_modules = check_module_names(self.target_modules, "method.target_modules")
