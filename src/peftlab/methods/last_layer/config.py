"""Options of last-layer tuning (``method=last-layer``)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.options import MethodOptions, check_choice, opt

HEAD_MODES = ("untied", "tied")


@dataclass
class LastLayerConfig(MethodOptions):
    head: str = opt(
        "untied",
        "with tied embeddings: untied = train a copy of the matrix as the head (inputs stay fixed) | "
        "tied = train the shared matrix (input embeddings change too); ignored when the base is not tied",
    )

    def check(self) -> None:
        check_choice(self.head, "method.head", HEAD_MODES)
