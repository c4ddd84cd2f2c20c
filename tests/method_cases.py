"""The one table of method test cases (PEFT's ``TEST_CASES``): every registered method has at least one entry.

``tests/test_method_cases.py`` runs every case through the behaviours every method must have (save -> load,
resume, budget count == built count, PEFT parity where the method has a converter, merge == unmerged where it has a
merge rule); other test files (gradient checkpointing, ...) parametrise over the same table. A method registered
without a case here fails the suite (:func:`method_params`). Adding a method adds one line to :data:`CASES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

FAMILIES = ("gpt2", "llama")


@dataclass(frozen=True)
class MethodCase:
    """One method with small options.

    Attributes:
        method: the registered name.
        options: ``method.*`` options; small sizes, dropout where the method has it (a checkpoint replay or a resume
            must redraw the same masks).
        families: the tiny model families it applies to (BitFit needs biases: GPT-2 only).
        lr: a learning rate at which a few steps move the weights visibly (the resume test).
        peft_families: the families whose PEFT export PEFT loads (None: all of ``families``); on the others the
            export must be refused (PEFT's LoHa, LoKr and OFT wrap nn.Linear only, not GPT-2's Conv1D).
    """

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    families: tuple[str, ...] = FAMILIES
    lr: float = 1e-2
    peft_families: tuple[str, ...] | None = None


CASES: dict[str, MethodCase] = {
    "adapter-houlsby": MethodCase("adapter-houlsby", {"bottleneck_size": 8}),
    "adapter-parallel": MethodCase("adapter-parallel", {"bottleneck_size": 4, "placement": "both", "dropout": 0.1}),
    "adapter-pfeiffer": MethodCase("adapter-pfeiffer", {"reduction_factor": 4}),
    "adapter-scaled-parallel": MethodCase("adapter-scaled-parallel", {"bottleneck_size": 8, "placement": "attn"}),
    "bitfit": MethodCase("bitfit", {}, ("gpt2",)),  # tiny Llama has no biases
    "full": MethodCase("full", {}, lr=1e-3),
    "ia3": MethodCase("ia3", {}),
    "intrinsic-dim": MethodCase("intrinsic-dim", {"d": 16}),
    "last-blocks": MethodCase("last-blocks", {"n_blocks": 1}, lr=1e-3),
    "last-layer": MethodCase("last-layer", {}),
    "lora": MethodCase("lora", {"r": 4, "target_modules": "all-linear", "dropout": 0.1}),
    "lora-pissa": MethodCase("lora", {"r": 4, "alpha": 8, "target_modules": ["q", "v", "o"], "init": "pissa"}),
    "lora-olora": MethodCase("lora", {"r": 4, "alpha": 8, "target_modules": ["q", "v", "o"], "init": "olora"}),
    "lora-plus": MethodCase("lora", {"r": 4, "target_modules": ["q", "v", "o"], "loraplus_lr_ratio": 16}),
    "loha": MethodCase("loha", {"r": 4, "target_modules": ["q", "v", "o", "down"]}, peft_families=("llama",)),
    "lokr": MethodCase("lokr", {"r": 2, "target_modules": ["q", "v", "o", "down"], "decompose_both": True},
                       peft_families=("llama",)),
    "mam": MethodCase("mam", {"n_tokens": 3, "hidden_size": 16, "bottleneck_size": 4, "dropout": 0.1}),
    "oft": MethodCase("oft", {"oft_block_size": 8, "target_modules": ["q", "v", "o", "down"], "module_dropout": 0.25},
                      peft_families=("llama",)),
    "prefix-tuning": MethodCase("prefix-tuning", {"n_tokens": 3, "hidden_size": 16}),
    "vera": MethodCase("vera", {"r": 8, "target_modules": ["q", "v", "o", "down"], "dropout": 0.1}),
    "prompt-tuning": MethodCase("prompt-tuning", {"n_tokens": 4, "init": "random"}, lr=3e-2),
}


def registered() -> list[Any]:
    from peftlab.registry import all_methods  # finds every method folder on first use

    return all_methods()


def method_params(*, where: Any = None) -> list[Any]:
    """``(case_id, family)`` params for every case of every registered method (those whose spec passes ``where``).

    A registered method without a case becomes a param that fails, naming the method.
    """
    params = []
    for spec in registered():
        if where is not None and not where(spec):
            continue
        cases = [case_id for case_id, case in CASES.items() if case.method == spec.name]
        if not cases:
            params.append(pytest.param(spec.name, None, id=f"{spec.name}-NO-CASE"))
        params += [pytest.param(case_id, family, id=f"{case_id}-{family}")
                   for case_id in cases for family in CASES[case_id].families]
    return params


def case_of(case_id: str, family: str | None) -> MethodCase:
    """The case, or a failure naming a registered method that has none."""
    if family is None:
        pytest.fail(f"method {case_id!r} is registered but has no entry in tests/method_cases.py CASES")
    return CASES[case_id]
