"""Parity with Hugging Face PEFT: the same weights give the same logits (LoRA, prompt tuning; GPT-2 and Llama).

PEFT's saved state dict (``get_peft_model_state_dict``) loads into ours after stripping ``base_model.model.``:
whole-module LoRA keys and the prompt key are PEFT's key layout.
"""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_FACTORIES, VOCAB, peft_greedy_by_forward, tiny_gpt2, tiny_llama
from torch import nn

from peftlab.methods import PeftMethod, get_method

peft = pytest.importorskip("peft")

PEFT_PREFIX = "base_model.model."
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:Position ids are not supported:UserWarning",  # PEFT's generate drops position ids for soft prompts
        "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",  # peft 0.21 on transformers 5
    ),
    pytest.mark.usefixtures("one_thread"),
]



def ours(family: str, method: str, options: dict) -> tuple[nn.Module, PeftMethod]:
    model = MODEL_FACTORIES[family]()
    spec = get_method(method)
    return model, spec.apply(model, spec.build_config(options))


def peft_lora(family: str, seed: int = 3, **lora_kwargs) -> nn.Module:
    """A PEFT LoRA model on the same base, with B made nonzero so the update matters."""
    model = peft.get_peft_model(MODEL_FACTORIES[family](), peft.LoraConfig(lora_dropout=0.0, **lora_kwargs))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # test code may match names; the library never does
                p.normal_(0, 0.3)
    return model.eval()


def peft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's adapter file contents, keys relative to the base model."""
    return {k.removeprefix(PEFT_PREFIX): v for k, v in peft.get_peft_model_state_dict(model).items()}


def compare(reference: torch.Tensor, got: torch.Tensor) -> None:
    assert reference.abs().max() > 0
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_llama_q_v_matches_peft(batch, rslora):
    reference = peft_lora("llama", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=rslora)
    model, method = ours("llama", "lora", {"r": 4, "alpha": 8, "target_modules": ["q", "v"], "rslora": rslora})
    method.load_adapter_state_dict(peft_state(reference))  # same keys: PEFT's file loads as is
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = reference(**inputs).logits
        compare(expected, model(**method.prepare_inputs(**inputs)).logits)
        base = MODEL_FACTORIES["llama"]()(**inputs).logits
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapters do change the output


def test_lora_gpt2_whole_c_attn_matches_peft_fan_in_fan_out(batch):
    reference = peft_lora("gpt2", r=4, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True)
    model, method = ours("gpt2", "lora", {"r": 4, "alpha": 16, "target_modules": ["c_attn"]})
    method.load_adapter_state_dict(peft_state(reference))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = reference(**inputs).logits
        compare(expected, model(**inputs).logits)
        method.merge()  # merging into Conv1D's (in, out) weight must transpose the update
        compare(expected, model(**inputs).logits)


def test_lora_gpt2_q_v_slices_match_peft_block_lora(batch):
    """q/v slices of c_attn = a PEFT c_attn LoRA of rank 2r with A = [A_q; A_v], B = [[B_q, 0], [0, 0], [0, B_v]]."""
    r, alpha, d = 2, 4.0, 32
    model, method = ours("gpt2", "lora", {"r": r, "alpha": alpha, "target_modules": ["q", "v"]})
    torch.manual_seed(4)
    with torch.no_grad():
        for p in method.trainable_parameters().values():
            p.normal_(0, 0.3)
    state = method.adapter_state_dict()
    # PEFT scaling alpha' / r' with r' = 2r equals alpha / r when alpha' = 2 alpha.
    reference = peft.get_peft_model(MODEL_FACTORIES["gpt2"](), peft.LoraConfig(
        r=2 * r, lora_alpha=2 * alpha, target_modules=["c_attn"], fan_in_fan_out=True)).eval()
    converted = {}
    for i in range(2):
        name = f"transformer.h.{i}.attn.c_attn"
        a_q, a_v = state[f"{name}.lora_A.q"], state[f"{name}.lora_A.v"]
        b = torch.zeros(3 * d, 2 * r)
        b[:d, :r], b[2 * d:, r:] = state[f"{name}.lora_B.q"], state[f"{name}.lora_B.v"]
        converted[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.cat([a_q, a_v])
        converted[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
    result = peft.set_peft_model_state_dict(reference, converted)
    assert not result.unexpected_keys
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        compare(reference(**inputs).logits, model(**inputs).logits)


def peft_prompt(family: str, n: int) -> nn.Module:
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
    model = peft.get_peft_model(MODEL_FACTORIES[family](), config).eval()
    with torch.no_grad():  # PEFT's random init is N(0, 1); scale it like real embeddings
        model.prompt_encoder["default"].embedding.weight.mul_(0.05)
    return model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prompt_tuning_forward_matches_peft(family, batch):
    n = 4
    reference = peft_prompt(family, n)
    model, method = ours(family, "prompt-tuning", {"n_tokens": n})
    state = peft_state(reference)
    assert list(state) == ["prompt_embeddings"]  # PEFT's adapter file: one tensor, our key
    method.load_adapter_state_dict(state)
    with torch.no_grad():
        expected = reference(**batch)
        got = model(**method.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"]))
    assert got.logits.shape == (3, n + 12, VOCAB)
    real = torch.cat([torch.ones(3, n, dtype=torch.bool), batch["attention_mask"].bool()], dim=1)
    compare(expected.logits[real], got.logits[real])
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-6, rtol=0)


def greedy_with_cache(model: nn.Module, method: PeftMethod, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """The runner's loop: prepare_inputs for the prefill only, then input_ids + KV cache, positions from the mask."""
    inputs = method.prepare_inputs(input_ids, torch.ones_like(input_ids))
    mask = inputs["attention_mask"]
    out = model(**inputs, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(steps - 1):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=tokens[-1], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                    cache=out.cache, use_cache=True)
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prompt_tuning_greedy_generation_matches_peft_step_by_step(family):
    """Against PEFT's forward pass at every step, not its generate(), which transformers 5.24 broke for prompt
    learning (see conftest.peft_greedy_by_forward)."""
    n, steps = 3, 5
    reference = peft_prompt(family, n)
    model, method = ours(family, "prompt-tuning", {"n_tokens": n})
    method.load_adapter_state_dict(peft_state(reference))
    torch.manual_seed(2)
    input_ids = torch.randint(2, VOCAB, (2, 6))
    with torch.no_grad():
        expected, _ = peft_greedy_by_forward(reference, input_ids, steps)
        ours_tokens = greedy_with_cache(model, method, input_ids, steps)
    assert torch.equal(ours_tokens, expected)


def test_tiny_factories_are_deterministic():
    """The parity tests build the same base twice; that relies on the factories seeding themselves."""
    for factory in (tiny_gpt2, tiny_llama):
        a, b = factory(), factory()
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
