"""Last-layer tuning: train the output head only; see :mod:`.method`."""

from peftlab.methods.base import MethodSpec, register
from peftlab.methods.last_layer.config import HEAD_MODES, LastLayerConfig
from peftlab.methods.last_layer.count import count_last_layer, last_layer_note
from peftlab.methods.last_layer.method import LastLayerMethod, apply_last_layer

SPEC = register(
    MethodSpec(
        name="last-layer",
        config_cls=LastLayerConfig,
        apply=apply_last_layer,
        summary="train the output head only (an untied copy of tied embeddings by default)",
        default_lr=1e-3,
        paper="https://arxiv.org/abs/2202.10054",
        count_trainable=count_last_layer,
        budget_note=last_layer_note,
        no_peft="PEFT has no adapter type that trains only the output head (modules_to_save needs another one)",
    )
)

__all__ = ["HEAD_MODES", "SPEC", "LastLayerConfig", "LastLayerMethod", "apply_last_layer"]
