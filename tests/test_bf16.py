"""bf16 autocast with the frozen matmul weights cast once (``frozen_matmul_weights_in_bf16``) computes exactly what
plain autocast computes, for every registered method on tiny GPT-2 and Llama, and puts the fp32 weights back."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import applied_method, method_family_cases, toy_examples

from peftlab.models.loading import cpu_has_fast_bf16, frozen_matmul_weights_in_bf16

pytestmark = pytest.mark.usefixtures("one_thread")

INPUT_IDS = torch.tensor([[5, 9, 17, 33, 40, 7, 2, 3], [11, 3, 60, 61, 62, 63, 8, 8]])
ATTENTION_MASK = torch.tensor([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]])  # left padding on row 1


def logits_and_grads(method) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits under bf16 autocast and the trainable parameters' gradients of their sum."""
    method.model.zero_grad(set_to_none=True)
    inputs = method.prepare_inputs(INPUT_IDS, ATTENTION_MASK)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = method.model(**inputs).logits
    logits.float().sum().backward()
    grads = {name: p.grad.clone() for name, p in method.trainable_parameters().items() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize(("name", "family"), method_family_cases())
def test_cast_once_equals_plain_autocast_bitwise(name, family):
    method = applied_method(name, family)
    before = {name: (p, p.detach().clone()) for name, p in method.model.named_parameters()}
    expected_logits, expected_grads = logits_and_grads(method)
    with frozen_matmul_weights_in_bf16(method.model) as swapped:
        got_logits, got_grads = logits_and_grads(method)
    assert torch.equal(got_logits, expected_logits)
    assert got_grads.keys() == expected_grads.keys()
    for key, grad in expected_grads.items():
        assert torch.equal(got_grads[key], grad), key
    frozen = [p for p in method.model.parameters() if not p.requires_grad and p.ndim == 2]
    assert swapped > 0 or not frozen or name == "intrinsic-dim"
    # The very same fp32 parameters are back, unchanged.
    after = dict(method.model.named_parameters())
    assert after.keys() == before.keys()
    for key, (param, value) in before.items():
        assert after[key] is param and param.dtype == value.dtype and torch.equal(param, value), key


def test_dora_and_tied_head_keep_their_fp32_sharers():
    """DoRA reads its base weight's norm; a tied head shares the embedding matrix, which must stay fp32."""
    from conftest import tiny_llama

    from peftlab.methods import get_method

    spec = get_method("lora")
    method = spec.apply(tiny_llama(), spec.build_config({"use_dora": True}))
    expected, _ = logits_and_grads(method)
    embedding = method.model.get_input_embeddings().weight
    with frozen_matmul_weights_in_bf16(method.model):
        assert method.model.get_input_embeddings().weight is embedding and embedding.dtype == torch.float32
        assert method.model.lm_head.weight.dtype == torch.bfloat16
        got, _ = logits_and_grads(method)
    assert torch.equal(got, expected)
    assert method.model.lm_head.weight is embedding  # tied again


def test_nested_use_swaps_nothing_more():
    method = applied_method("lora", "llama")
    with frozen_matmul_weights_in_bf16(method.model) as outer, frozen_matmul_weights_in_bf16(method.model) as inner:
        assert outer > 0 and inner == 0


@pytest.mark.parametrize(("flags", "capability", "expected"), [
    ("fpu avx2 avx512f avx512_bf16 amx_tile", "AVX512", True),
    ("fpu avx2 avx512f amx_bf16 amx_tile", "AVX512", True),
    ("fpu avx2 avx512f avx512_vnni", "AVX512", False),  # AVX512 without bf16 (Skylake/Cascade Lake)
    ("fpu avx2 avx512_bf16", "AVX2", False),  # torch does not run AVX512 kernels here
    ("fpu avx2", "AVX2", False),
])
def test_cpu_has_fast_bf16_reads_the_flags(flags, capability, expected):
    cpuinfo = f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n"
    assert cpu_has_fast_bf16(cpuinfo, capability) is expected
    assert cpu_has_fast_bf16("processor\t: 0\n", "AVX512") is False  # no flags line: no claim


def _plain_autocast(monkeypatch, module) -> None:
    """Make ``module`` run plain autocast (the frozen weights cast at every forward), as before the cast-once."""
    monkeypatch.setattr(module, "frozen_matmul_weights_in_bf16", lambda model: contextlib.nullcontext(0))


def test_trainer_bf16_trains_exactly_as_plain_autocast(tmp_path, monkeypatch):
    import peftlab.training.trainer as trainer_module
    from peftlab.config import TrainConfig

    def fit(out: str):
        method = applied_method("lora", "llama")
        originals = {name: p for name, p in method.model.named_parameters()}
        cfg = TrainConfig(bf16=True, max_steps=3, batch_size=4, log_every=1)
        trainer = trainer_module.Trainer(method, toy_examples(12, 0, 5), [], cfg, tmp_path / out, pad_id=1, lr=1e-2)
        state = trainer.fit()
        assert all(p is originals[name] and p.dtype == torch.float32 for name, p in method.model.named_parameters())
        return state.loss_curve, {k: v.detach().clone() for k, v in method.trainable_parameters().items()}

    curve, weights = fit("cast-once")
    _plain_autocast(monkeypatch, trainer_module)
    plain_curve, plain_weights = fit("plain")
    assert curve == plain_curve and len(curve) == 3
    assert all(torch.equal(weights[k], plain_weights[k]) for k in weights)


def test_predictor_bf16_equals_plain_autocast(tiny_llama_dir, monkeypatch):
    import peftlab.evaluation.generate as generate_module
    from peftlab.config import load_config
    from peftlab.lab.experiment import build
    from peftlab.tasks.base import Example

    setup = build(load_config(None, [f"model.name={tiny_llama_dir}", "train.bf16=true", "method=lora",
                                     "task.name=summarization", "task.max_source_tokens=64"]))
    assert setup.predictor().autocast
    examples = [Example(id=str(i), source=text, target="x", references=["x"])
                for i, text in enumerate(["a short one", "a somewhat longer source text about cats and dogs"])]
    embedding = setup.method.model.get_input_embeddings().weight

    def run():
        predictor = setup.predictor()
        return predictor.generate(examples, 6), predictor.score_choices(examples, ["yes", "no way"])

    texts, scores = run()
    assert setup.method.model.get_input_embeddings().weight is embedding and embedding.dtype == torch.float32
    assert setup.method.model.lm_head.weight is embedding  # the tied head is restored
    _plain_autocast(monkeypatch, generate_module)
    plain_texts, plain_scores = run()
    assert texts == plain_texts and scores == plain_scores
