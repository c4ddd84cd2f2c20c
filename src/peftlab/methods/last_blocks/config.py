"""Options of last-N-blocks tuning (``method=last-blocks``)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.config import check, check_choice, opt

HEAD_MODES = ("none", "untied", "tied")


@dataclass
class LastBlocksConfig:
    n_blocks: int = opt(2, "how many transformer blocks train, counted from the top (1..num_layers)")
    final_norm: bool = opt(True, "also train the norm after the last block (GPT-2 ln_f, Llama norm)")
    head: str = opt(
        "none",
        "output head: none = frozen | untied = train it (with tied embeddings: a copy of the matrix, inputs stay "
        "fixed) | tied = train it (with tied embeddings: the shared matrix, so the input embeddings change too)",
    )

    def __post_init__(self) -> None:
        n = self.n_blocks
        check(isinstance(n, int) and not isinstance(n, bool) and n >= 1, "method.n_blocks",
              f"must be an integer >= 1 (and at most the model's number of layers), got {n!r}")
        check(isinstance(self.final_norm, bool), "method.final_norm",
              f"must be true or false, got {self.final_norm!r}")
        check_choice(self.head, "method.head", HEAD_MODES)
