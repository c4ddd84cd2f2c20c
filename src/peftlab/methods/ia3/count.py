"""(IA)^3's trainable count from the model config: sum over targets of d_out_slice (output scaling) or d_in (input
scaling of a whole ``feedforward_modules`` layer), by the rules of :func:`.method.feedforward_names`.
"""

from __future__ import annotations

from functools import partial

from peftlab.methods.ia3.config import IA3Config
from peftlab.methods.ia3.method import feedforward_names
from peftlab.models.shape import ModelShape, resolve_target_shapes


def count_ia3(shape: ModelShape, config: IA3Config) -> int:
    """Parameters :func:`peftlab.methods.ia3.apply_ia3` trains on a model of this shape.

    Raises:
        ConfigError: the targets or feed-forward modules match nothing or are inconsistent.
    """
    targets = resolve_target_shapes(shape, config.target_modules, key="method.target_modules")
    feedforward = feedforward_names(partial(resolve_target_shapes, shape), config, targets)
    # A feed-forward target is always a whole layer (one entry per module), so no input is counted twice.
    return sum(t.in_features if t.name in feedforward else t.out_size for t in targets)
