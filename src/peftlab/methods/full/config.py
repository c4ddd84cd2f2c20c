"""Options of full fine-tuning (``method=full``): none; every weight trains."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.options import MethodOptions


@dataclass
class FullConfig(MethodOptions):
    """Full fine-tuning has no options (the learning rate is ``train.lr``)."""
