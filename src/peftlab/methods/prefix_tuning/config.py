"""Options of prefix tuning (``method=prefix-tuning``)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.options import MethodOptions, check, opt


@dataclass
class PrefixTuningConfig(MethodOptions):
    n_tokens: int = opt(20, "number of virtual key/value positions prepended in every layer")
    reparametrize: bool = opt(
        True,
        "train P = MLP(P') (Li & Liang's reparametrization, PEFT's prefix_projection) instead of P directly",
    )
    hidden_size: int = opt(512, "hidden width of the reparametrization MLP (reparametrize=true)")
    drop_mlp_after_training: bool = opt(
        True,
        "after training, fold P = MLP(P') into a stored P and drop the MLP, so the adapter holds only P "
        "(PEFT saves the same)",
    )

    def check(self) -> None:
        check(self.n_tokens > 0, "method.n_tokens", f"must be an integer > 0, got {self.n_tokens!r}")
        check(self.hidden_size > 0, "method.hidden_size", f"must be an integer > 0, got {self.hidden_size!r}")
