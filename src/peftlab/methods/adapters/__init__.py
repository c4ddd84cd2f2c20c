"""Bottleneck adapters: sequential (Houlsby et al. 2019, Pfeiffer et al. 2020) and parallel / scaled parallel
(He et al. 2022) adapters around each block's attention and feed-forward sub-layers; see :mod:`.layer` for the math.
"""

from peftlab.methods.adapters.config import (
    AdapterConfig,
    HoulsbyAdapterConfig,
    ParallelAdapterConfig,
    PfeifferAdapterConfig,
    ScaledParallelAdapterConfig,
)
from peftlab.methods.adapters.count import adapter_note, count_adapters
from peftlab.methods.adapters.layer import AdaptedSublayer, BottleneckAdapter
from peftlab.methods.adapters.method import AdapterMethod, apply_adapters
from peftlab.methods.base import MethodSpec, SizeKnob, register

DEFAULT_LR = 1e-3
# Solving a budget sets bottleneck_size; a reduction_factor in the options is the other way to say it, so dropped.
BOTTLENECK_KNOB = SizeKnob("bottleneck_size", replaces=("reduction_factor",))

NO_PEFT = "PEFT has no bottleneck adapter type (those live in the separate adapters library)"

SPECS = tuple(
    register(MethodSpec(name=cls.METHOD, config_cls=cls, apply=apply_adapters, summary=summary,
                        default_lr=DEFAULT_LR, paper=paper, count_trainable=count_adapters, size_knob=BOTTLENECK_KNOB,
                        budget_note=adapter_note, no_peft=NO_PEFT))
    for cls, summary, paper in (
        (HoulsbyAdapterConfig, "sequential bottleneck adapters after each block's attention output and FFN output",
         "https://arxiv.org/abs/1902.00751"),
        (PfeifferAdapterConfig, "one sequential bottleneck adapter after each block's FFN output",
         "https://arxiv.org/abs/2005.00247"),
        (ParallelAdapterConfig, "parallel bottleneck adapter: FFN (or attention) output + adapter(its input)",
         "https://arxiv.org/abs/2110.04366"),
        (ScaledParallelAdapterConfig, "parallel bottleneck adapter with its output scaled by s (default 4)",
         "https://arxiv.org/abs/2110.04366"),
    )
)

__all__ = ["SPECS", "AdaptedSublayer", "AdapterConfig", "AdapterMethod", "BottleneckAdapter", "HoulsbyAdapterConfig",
           "ParallelAdapterConfig", "PfeifferAdapterConfig", "ScaledParallelAdapterConfig", "apply_adapters"]
