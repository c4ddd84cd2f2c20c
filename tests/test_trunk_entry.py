"""Running the trunk in two parts (models/trunk_entry.py): the bottom blocks' output, fed to the top blocks, gives
the whole trunk's output at every real position, bit for bit, on GPT-2 (learned position embeddings) and Llama
(rotary embeddings, grouped-query attention), with right padding."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from peftlab.models.arch import transformer_blocks, trunk
from peftlab.models.trunk_entry import blocks_cut_to, can_enter_mid_trunk, entering_at, hidden_entering

pytestmark = pytest.mark.usefixtures("one_thread")


def three_blocks(family: str) -> nn.Module:
    """A tiny model with 3 blocks (two places to cut), in eval mode."""
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=3, n_head=4,
                                          pad_token_id=1)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        pad_token_id=1)).eval()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("block", [1, 2])
def test_two_parts_equal_the_whole_trunk(family, block, batch):
    model = three_blocks(family)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    whole = trunk(model)(**inputs, use_cache=False).last_hidden_state  # (3, 12, 32)
    entering = hidden_entering(model, block, inputs)
    assert entering.shape == whole.shape and not entering.requires_grad
    real = batch["attention_mask"].bool()
    padded = entering.clone()
    padded[~real] = 0.0  # what a cache restores: real positions only
    with entering_at(model, block, padded):
        top = trunk(model)(**inputs, use_cache=False).last_hidden_state
    assert torch.equal(top[real], whole[real])
    assert len(transformer_blocks(model)) == 3  # the full block list is back


def test_only_the_cut_blocks_run():
    model = three_blocks("llama")
    calls = []
    for i, block in enumerate(transformer_blocks(model)):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    ids = torch.randint(2, VOCAB, (1, 5))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    entering = hidden_entering(model, 2, inputs)
    with entering_at(model, 2, entering):
        trunk(model)(**inputs, use_cache=False)
    assert calls == [0, 1, 2]


def test_the_block_list_is_restored_after_an_error():
    model = three_blocks("gpt2")
    blocks = transformer_blocks(model)
    with pytest.raises(RuntimeError, match="boom"), blocks_cut_to(model, 1, 3):
        assert len(transformer_blocks(model)) == 2
        raise RuntimeError("boom")
    assert transformer_blocks(model) is blocks
    with pytest.raises(ValueError, match=r"blocks \[2, 2\) is not a non-empty range of the 3 blocks"), \
            blocks_cut_to(model, 2, 2):
        pass


def test_entering_with_the_wrong_shape_is_refused():
    model = three_blocks("llama")
    ids = torch.randint(2, VOCAB, (2, 5))
    with pytest.raises(ValueError, match=r"to enter with are \(2, 4, 32\) but the trunk's inputs give \(2, 5, 32\)"), \
            entering_at(model, 1, torch.zeros(2, 4, 32)):
        trunk(model)(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


def test_blocks_picked_by_position_are_refused():
    model = three_blocks("llama")
    assert can_enter_mid_trunk(model) is None
    model.config.layer_types = ["sliding_attention", "full_attention", "full_attention"]
    assert "several kinds (full_attention, sliding_attention)" in can_enter_mid_trunk(model)
    with pytest.raises(TypeError, match="cannot run part of the trunk of LlamaForCausalLM"):
        hidden_entering(model, 1, {"input_ids": torch.ones(1, 3, dtype=torch.long)})
