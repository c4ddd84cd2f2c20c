"""Last-N-blocks tuning: train the top transformer blocks (and the final norm, optionally the head); see
:mod:`.method`."""

from peftlab.methods.base import MethodSpec, SizeKnob, register
from peftlab.methods.last_blocks.config import HEAD_MODES, LastBlocksConfig
from peftlab.methods.last_blocks.count import count_last_blocks, max_blocks
from peftlab.methods.last_blocks.method import LastBlocksMethod, apply_last_blocks

SPEC = register(
    MethodSpec(
        name="last-blocks",
        config_cls=LastBlocksConfig,
        apply=apply_last_blocks,
        summary="train the top n_blocks transformer blocks, the final norm and optionally the output head",
        default_lr=1e-4,
        paper="https://arxiv.org/abs/1911.03090",
        count_trainable=count_last_blocks,
        size_knob=SizeKnob("n_blocks", maximum=max_blocks),
        no_peft="PEFT has no adapter type that trains whole blocks (modules_to_save needs another one)",
    )
)

__all__ = ["HEAD_MODES", "SPEC", "LastBlocksConfig", "LastBlocksMethod", "apply_last_blocks"]
