"""``torch.compile`` of the greedy decode step over a static slot cache: the same tokens as the per-prompt greedy
loop, and one compiled graph for every step of a batch (refills included), not one per step.

The default run traces merged LoRA with ``aot_eager`` (dynamo's graph capture and the functionalisation of the
in-place cache writes, without code generation); inductor itself, which generates C++ and compiles it with gcc
(tens of seconds per model), runs on every case in the ``slow`` test (``PEFTLAB_SLOW_TESTS=1``)."""

from __future__ import annotations

import pytest
import torch
from conftest import applied_method, tiny_llama
from test_generation import reference_greedy
from test_generation_continuous import PROMPTS, STEPS, eos_for_varied_lengths, varied
from torch._dynamo.testing import CompileCounterWithBackend

import peftlab.evaluation.generate as generate_module
from peftlab.evaluation.generate import continuous_greedy_generate, decode_step
from peftlab.methods.base import BaseModelHandle

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
# The methods that change the forward in different places: merged weights, a wrapped layer, virtual tokens in the
# cache (prompt tuning), prefixes in a cache subclass (prefix tuning); and the bare model.
CASES = [("lora", "llama"), ("ia3", "gpt2"), ("prompt-tuning", "llama"), ("prefix-tuning", "gpt2"),
         ("zero-shot", "llama")]


def case(name: str, family: str):
    """The method (merged when it can be), an eos set that ends rows at different steps, and the reference tokens."""
    method = varied(BaseModelHandle(tiny_llama()) if name == "zero-shot" else applied_method(name, family))
    if method.mergeable:
        method.merge()
    eos_ids = eos_for_varied_lengths(method, PROMPTS)
    return method, eos_ids, [reference_greedy(method, p, eos_ids, STEPS) for p in PROMPTS]


@pytest.fixture
def counted_compile(monkeypatch):
    """Compile the decode step with ``backend`` and count the graphs dynamo compiles (from a clean dynamo)."""

    def use(backend: str) -> CompileCounterWithBackend:
        torch._dynamo.reset()
        counter = CompileCounterWithBackend(backend)
        monkeypatch.setattr(generate_module, "_compiled_decode_step", torch.compile(decode_step, backend=counter))
        return counter

    yield use
    torch._dynamo.reset()


def generate(method, eos_ids, drop_fraction: float, prompts=PROMPTS) -> list[list[int]]:
    return continuous_greedy_generate(method, prompts, 1, eos_ids, STEPS, CPU, batch_size=3,
                                      drop_fraction=drop_fraction, compile_step=True)


def test_compiled_step_tokens_and_graph_count(counted_compile):
    method, eos_ids, expected = case("lora", "llama")
    counter = counted_compile("aot_eager")
    assert generate(method, eos_ids, drop_fraction=0.0) == expected
    assert counter.frame_count == 1, "every decode step of the batch, refills included, reuses one graph"
    assert generate(method, eos_ids, drop_fraction=0.25) == expected
    # Dropping finished rows in the tail changes the batch size: dynamo recompiles once with that dimension dynamic,
    # and once more for a single row (a size of 1 is always specialised) ...
    assert counter.frame_count <= 3
    graphs = counter.frame_count
    # ... and then serves every later batch with those graphs.
    assert generate(method, eos_ids, drop_fraction=0.25, prompts=PROMPTS[::-1]) == expected[::-1]
    assert counter.frame_count == graphs


@pytest.mark.slow
@pytest.mark.parametrize(("name", "family"), CASES)
def test_inductor_compiled_step_gives_the_same_tokens(name, family, counted_compile):
    method, eos_ids, expected = case(name, family)
    counter = counted_compile("inductor")
    assert generate(method, eos_ids, drop_fraction=0.25) == expected
    assert counter.frame_count <= 3  # as above: the first batch size, a dynamic one, and one row
