"""LoKr against PEFT 0.21.2: the same factorization of every dimension, the same factor shapes and trainable count,
and a PEFT-made adapter (full and factored W1 / W2) imports with the same logits."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_FACTORIES

from peftlab.interop.adapter_files import load_adapter
from peftlab.methods.budget import count_trainable
from peftlab.methods.lokr.factors import factorization
from peftlab.models.shape import model_shape

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning",
                                                                                "ignore::FutureWarning")]
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def logits(model):
    torch.manual_seed(1)
    with torch.no_grad():
        return model(input_ids=torch.randint(2, 96, (2, 7))).logits


def test_factorization_is_peft_s_for_every_dimension_and_factor():
    lokr_layer = pytest.importorskip("peft.tuners.lokr.layer")
    for dimension in range(1, 800):
        for factor in (-1, 1, 2, 3, 4, 8, 16):
            assert factorization(dimension, factor) == lokr_layer.factorization(dimension, factor), (dimension, factor)


@pytest.mark.parametrize(("r", "decompose_both", "decompose_factor"), [(8, False, -1), (1, True, -1), (2, False, 4)])
def test_a_peft_lokr_adapter_imports_with_the_same_shapes_count_and_logits(r, decompose_both, decompose_factor,
                                                                           tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoKrConfig(r=r, alpha=3, target_modules=TARGETS, decompose_both=decompose_both,
                             decompose_factor=decompose_factor)
    reference = peft.get_peft_model(MODEL_FACTORIES["llama"](), config)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lokr_" in name:
                p.add_(0.1 * torch.randn_like(p))
    reference.eval().save_pretrained(tmp_path / "peft")
    peft_shapes = {n.removeprefix("base_model.model.").replace(".default", ""): tuple(p.shape)
                   for n, p in reference.named_parameters() if p.requires_grad}
    expected = logits(reference)

    fresh = MODEL_FACTORIES["llama"]()
    imported, record = load_adapter(fresh, tmp_path / "peft")
    assert {k: tuple(p.shape) for k, p in imported.trainable_parameters().items()} == peft_shapes
    options = {"r": r, "target_modules": TARGETS, "decompose_both": decompose_both,
               "decompose_factor": decompose_factor}
    assert count_trainable("lokr", model_shape(fresh.config), options) == sum(
        torch.Size(s).numel() for s in peft_shapes.values())
    torch.testing.assert_close(logits(fresh.eval()), expected, rtol=0, atol=1e-5)
    assert (expected - logits(MODEL_FACTORIES["llama"]())).abs().max() > 1e-3


def test_the_count_is_not_monotone_in_r_so_lokr_has_no_size_knob():
    from peftlab.registry import get_method

    shape = model_shape(MODEL_FACTORIES["llama"]().config)
    # down_proj (32 x 64) with decompose_factor 2: W1 (2, 2), W2 (16, 32); factored r (16 + 32) below r = 16, full
    # 16 * 32 = 512 from r = 16 on.
    options = {"target_modules": ["down"], "decompose_factor": 2}
    counts = [count_trainable("lokr", shape, {**options, "r": r}) for r in (15, 16)]
    assert counts == [2 * (4 + 15 * 48), 2 * (4 + 512)]
    assert get_method("lokr").size_knob is None
