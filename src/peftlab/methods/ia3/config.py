"""Options of (IA)^3 (``method=ia3``)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.options import MethodOptions, check_module_names, opt


@dataclass
class IA3Config(MethodOptions):
    target_modules: list[str] | str = opt(
        ["k", "v", "down"],
        "layers to rescale: canonical q k v o gate up down (GPT-2 q/k/v are slices of c_attn), module-name suffixes "
        "(c_attn, k_proj, ...), or one regex string; default: keys, values and the FFN down projection's input",
    )
    feedforward_modules: list[str] | str | None = opt(
        None,
        "targets whose INPUT is rescaled (a whole layer, a subset of target_modules, as PEFT's feedforward_modules); "
        "the others have their output rescaled; null: the FFN down projection (down) when it is targeted",
    )

    def check(self) -> None:
        self.target_modules = check_module_names(self.target_modules, "method.target_modules")
        self.feedforward_modules = check_module_names(self.feedforward_modules, "method.feedforward_modules",
                                                      allow_empty=True, allow_none=True)
