"""Options of LoRA (``method=lora``)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.options import MethodOptions, check, check_choice, check_module_names, opt

# default: A kaiming-uniform, B = 0 (the base is untouched). pissa / olora (principal singular vectors / QR of W)
# start B A at the top of W and train on the residual base W - s B0 A0; see layer.py.
LORA_INITS = ("default", "pissa", "olora")


@dataclass
class LoraConfig(MethodOptions):
    r: int = opt(8, "rank of the update B A (A: r x d_in, B: d_out x r)")
    alpha: float = opt(16.0, "scaling numerator: the update is (alpha / r) B A, or (alpha / sqrt(r)) B A with rslora")
    dropout: float = opt(0.0, "dropout on the LoRA branch's input only, in [0, 1)")
    target_modules: list[str] | str = opt(
        ["q", "v"],
        "layers to adapt: canonical q k v o gate up down, 'all-linear', module-name suffixes (c_attn, q_proj, ...), "
        "or one regex string over full module names",
    )
    rslora: bool = opt(False, "rank-stabilized scaling alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023)")
    use_dora: bool = opt(
        False,
        "DoRA (Liu et al. 2024): a trainable magnitude per output feature times the normalised direction W + s B A",
    )
    init: str = opt(
        "default",
        "default (A kaiming-uniform, B = 0) | pissa (Meng et al. 2024: B A = the r principal singular components of W "
        "/ s, base W - s B A) | olora (Buyukakyuz 2024: B A = the first r columns / rows of W = QR, base W - s B A)",
    )
    loraplus_lr_ratio: float = opt(
        1.0,
        "LoRA+ (Hayou et al. 2024): B (and DoRA's magnitude) train at this multiple of train.lr, A at train.lr; "
        "PEFT's loraplus_lr_ratio (the paper suggests 16; 1 = plain LoRA)",
    )

    def check(self) -> None:
        check(self.r > 0, "method.r", f"must be an integer > 0, got {self.r!r}")
        check(self.alpha > 0, "method.alpha", f"must be a number > 0, got {self.alpha!r}")
        check(0 <= self.dropout < 1, "method.dropout", f"must be in [0, 1), got {self.dropout!r}")
        self.target_modules = check_module_names(self.target_modules, "method.target_modules")
        check_choice(self.init, "method.init", LORA_INITS)
        check(self.loraplus_lr_ratio > 0, "method.loraplus_lr_ratio",
              f"must be a number > 0 (1 = plain LoRA, LoRA+ suggests 16), got {self.loraplus_lr_ratio!r}")
        check(not (self.use_dora and self.init != "default"), "method.init",
              f"{self.init} with use_dora is not supported; use one of the two")

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rslora."""
        return self.alpha / (self.r**0.5 if self.rslora else self.r)
