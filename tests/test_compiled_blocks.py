"""``train.compile`` (models/compiled_blocks.py): the blocks run compiled during training and train what the eager
loop trains, length bucketing's varying shapes do not recompile, and a block that cannot be compiled stops the run
with an error that says so.

Compiling takes seconds to minutes even for the tiny models (each graph is traced, split into forward and backward,
and for inductor turned into C++ that gcc compiles), so the default run only checks the option and that a block
dynamo cannot trace in one graph stops the run (dynamo gives up at once). The ``slow`` tests
(``PEFTLAB_SLOW_TESTS=1``) train with ``aot_eager`` (dynamo's graph capture and AOTAutograd's forward/backward split,
without code generation: the same bits as eager), counting the graphs, and with inductor, whose fused kernels round
differently: the results agree within float tolerance.
"""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_FACTORIES, toy_examples
from torch._dynamo.testing import CompileCounterWithBackend

import peftlab.methods  # noqa: F401  registers every method
from peftlab.config import ConfigError, TrainConfig, load_config
from peftlab.data.batching import length_bucketed_batches
from peftlab.methods import PeftMethod, get_method
from peftlab.models import compiled_blocks as cb
from peftlab.models.arch import transformer_blocks
from peftlab.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# LoRA with dropout (its masks must match the eager run's) and prompt tuning (virtual tokens before the blocks).
METHODS = {"lora": {"r": 4, "target_modules": ["q", "v"], "dropout": 0.1},
           "prompt-tuning": {"n_tokens": 4, "init": "random"}}
BATCH = 3


def applied(name: str, family: str) -> PeftMethod:
    spec = get_method(name)
    return spec.apply(MODEL_FACTORIES[family](), spec.build_config(dict(METHODS[name])))


def train(method: PeftMethod, tmp_path, compile_on: bool, **overrides) -> tuple[Trainer, dict[str, torch.Tensor]]:
    """3 epochs of 16 examples of 5 lengths in batches of 3 (the last one 1 row), then a validation: many shapes."""
    settings = {"batch_size": BATCH, "epochs": 3, "log_every": 1, "seed": 0, "compile": compile_on}
    torch.manual_seed(0)
    trainer = Trainer(method, toy_examples(16, 0, 5), toy_examples(3, 1, 5), TrainConfig(**{**settings, **overrides}),
                      tmp_path / str(compile_on), pad_id=1, lr=3e-2)
    trainer.fit()
    return trainer, {k: p.detach().clone() for k, p in trainer.params.items()}


@pytest.fixture
def counted(monkeypatch):
    """Compile with ``aot_eager`` through a counter of the graphs dynamo compiles (from a clean dynamo)."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(cb, "BACKEND", counter)
    yield counter
    torch._dynamo.reset()


def test_the_option_and_what_it_is_not_combined_with():
    assert load_config(None, []).train.compile is False
    assert load_config(None, ["train.compile=true"]).train.compile is True
    for other in ("gradient_checkpointing", "recompute_elementwise"):
        with pytest.raises(ConfigError, match=rf"train\.compile: .*train\.{other}"):
            load_config(None, ["train.compile=true", f"train.{other}=true"])


def test_a_block_dynamo_cannot_trace_whole_stops_the_run(tmp_path, counted):
    method = applied("lora", "gpt2")
    block = transformer_blocks(method.model)[0]
    plain = type(block).forward

    def with_a_graph_break(*args, **kwargs):
        torch._dynamo.graph_break()
        return plain(block, *args, **kwargs)

    block.forward = with_a_graph_break
    with pytest.raises(cb.CompileError, match=r"train\.compile=true: the transformer blocks of GPT2LMHeadModel with "
                                              r"LoraMethod could not be compiled \(.+\); set train\.compile=false"):
        train(method, tmp_path, True, max_steps=1)
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in transformer_blocks(method.model))


@pytest.mark.slow
@pytest.mark.parametrize(("name", "family"), [("lora", "llama"), ("prompt-tuning", "gpt2")])
def test_compiled_training_equals_eager_and_does_not_recompile_per_shape(name, family, tmp_path, counted):
    eager_trainer, eager = train(applied(name, family), tmp_path, False)
    assert counted.frame_count == 0
    compiled_trainer, compiled = train(applied(name, family), tmp_path, True)
    for key, weight in eager.items():
        torch.testing.assert_close(compiled[key], weight, rtol=1e-6, atol=1e-7, msg=key)
    assert [x for _, x in compiled_trainer.state.loss_curve] == pytest.approx(
        [x for _, x in eager_trainer.state.loss_curve], rel=1e-6)
    # 18 steps over batches of many (rows, length) shapes: the graphs do not follow the shapes. What does make one:
    # autograd mode (training; validation under no_grad), whether a block's input requires grad (LoRA's first
    # block's does not, the others' do), a batch without padding (the model then passes no mask), a batch of one
    # row (dynamo specialises size 1).
    lengths = compiled_trainer.lengths
    shapes = {(len(rows), max(lengths[i] for i in rows))
              for epoch in range(3) for rows in length_bucketed_batches(lengths, BATCH, 0, epoch, True)}
    assert len(shapes) >= 6 and 1 <= counted.frame_count <= 8, (shapes, counted.frame_count)
    blocks = transformer_blocks(compiled_trainer.model)
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in blocks)  # evaluation runs eager again


@pytest.mark.slow
@pytest.mark.parametrize(("name", "family"), [("lora", "gpt2"), ("prompt-tuning", "llama")])
def test_inductor_trains_what_eager_trains(name, family, tmp_path):
    torch._dynamo.reset()
    _, eager = train(applied(name, family), tmp_path, False)
    _, compiled = train(applied(name, family), tmp_path, True)
    for key, weight in eager.items():
        torch.testing.assert_close(compiled[key], weight, rtol=1e-4, atol=1e-5, msg=key)
    torch._dynamo.reset()
