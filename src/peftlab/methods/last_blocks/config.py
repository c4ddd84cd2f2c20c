"""Options of last-N-blocks tuning (``method=last-blocks``)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.options import MethodOptions, check, check_choice, opt

HEAD_MODES = ("none", "untied", "tied")


@dataclass
class LastBlocksConfig(MethodOptions):
    n_blocks: int = opt(2, "how many transformer blocks train, counted from the top (1..num_layers)")
    final_norm: bool = opt(True, "also train the norm after the last block (GPT-2 ln_f, Llama norm)")
    head: str = opt(
        "none",
        "output head: none = frozen | untied = train it (with tied embeddings: a copy of the matrix, inputs stay "
        "fixed) | tied = train it (with tied embeddings: the shared matrix, so the input embeddings change too)",
    )

    def check(self) -> None:
        check(self.n_blocks >= 1, "method.n_blocks",
              f"must be an integer >= 1 (and at most the model's number of layers), got {self.n_blocks!r}")
        check_choice(self.head, "method.head", HEAD_MODES)
