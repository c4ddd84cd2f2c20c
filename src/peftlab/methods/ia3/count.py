"""(IA)^3's trainable count from the model config: sum over targets of d_out_slice (output scaling) or d_in (input
scaling of a whole ``feedforward_modules`` layer), by the rules of :func:`.method.feedforward_names`.
"""

from __future__ import annotations

from peftlab.config import ConfigError
from peftlab.methods.ia3.config import IA3Config
from peftlab.methods.ia3.method import DEFAULT_FEEDFORWARD
from peftlab.models.shape import ModelShape, TargetShape, resolve_target_shapes


def _feedforward(shape: ModelShape, config: IA3Config, targets: list[TargetShape]) -> set[str]:
    """Module paths whose input is rescaled; raises ``ConfigError`` where ``apply_ia3`` does."""
    target_names = {t.name for t in targets}
    sliced = {t.name for t in targets if t.part is not None}
    if config.feedforward_modules is None:
        try:
            default = resolve_target_shapes(shape, DEFAULT_FEEDFORWARD)
        except ConfigError:
            return set()
        return {t.name for t in default} & (target_names - sliced)
    if not config.feedforward_modules:
        return set()
    key = "method.feedforward_modules"
    chosen = resolve_target_shapes(shape, config.feedforward_modules, key=key)
    for t in chosen:
        if t.part is not None or t.name in sliced:
            raise ConfigError(f"{key}: {t.name} is targeted as {t.part or 'q/k/v'} output slices; input scaling "
                              f"rescales a whole layer's input, so target the whole layer or drop it from {key}")
        if t.name not in target_names:
            raise ConfigError(f"{key}: {t.name} is not among method.target_modules; feedforward modules must be a "
                              f"subset of the targets (as in PEFT)")
    return {t.name for t in chosen}


def count_ia3(shape: ModelShape, config: IA3Config) -> int:
    """Parameters :func:`peftlab.methods.ia3.apply_ia3` trains on a model of this shape.

    Raises:
        ConfigError: the targets or feed-forward modules match nothing or are inconsistent.
    """
    targets = resolve_target_shapes(shape, config.target_modules, key="method.target_modules")
    feedforward = _feedforward(shape, config, targets)
    # A feed-forward target is always a whole layer (one entry per module), so no input is counted twice.
    return sum(t.in_features if t.name in feedforward else t.out_size for t in targets)
