"""BitFit (Ben Zaken et al. 2021): train the bias terms only; see :mod:`.method`."""

from peftlab.methods.base import MethodSpec, register
from peftlab.methods.bitfit.config import BIAS_GROUPS, BitFitConfig
from peftlab.methods.bitfit.count import count_bitfit
from peftlab.methods.bitfit.method import BitFitMethod, apply_bitfit, bias_parameters

SPEC = register(
    MethodSpec(
        name="bitfit",
        config_cls=BitFitConfig,
        apply=apply_bitfit,
        summary="train the bias terms only (all, attention or MLP); needs a model with biases, e.g. GPT-2",
        default_lr=1e-3,
        paper="https://arxiv.org/abs/2106.10199",
        count_trainable=count_bitfit,
        no_peft="PEFT has no bias-only adapter type (its bias option trains biases next to another adapter)",
    )
)

__all__ = ["BIAS_GROUPS", "SPEC", "BitFitConfig", "BitFitMethod", "apply_bitfit", "bias_parameters"]
