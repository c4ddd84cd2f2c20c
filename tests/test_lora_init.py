"""LoRA's PiSSA and OLoRA initialisations (``method.init``) against Hugging Face PEFT's ``init_lora_weights``.

The shared table (method_cases.py: lora-pissa, lora-olora) covers save/load, resume, budget, merge and the export
as a plain rank-2r LoRA on the untouched base; here: the same initial A, B and residual base as PEFT, the same
logits after training-like changes, and a PEFT PiSSA/OLoRA folder (not converted) imported onto the untouched base.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from peftlab.interop.adapter_files import load_adapter
from peftlab.registry import get_method

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]

TARGETS = {"peftlab": ["q", "v", "o"], "peft": ["q_proj", "v_proj", "o_proj"]}


def both(init: str):
    ours = get_method("lora").apply(tiny_llama(), get_method("lora").build_config(
        {"r": 4, "alpha": 8, "target_modules": TARGETS["peftlab"], "init": init}))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["peft"], init_lora_weights=init,
                             task_type="CAUSAL_LM")
    reference = peft.get_peft_model(tiny_llama(), config)
    return ours, reference


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_same_initial_factors_residual_base_and_logits_as_peft(init):
    ours, reference = both(init)
    theirs = dict(reference.named_parameters())
    for name, layer in ours.layers.items():
        prefix = f"base_model.model.{name}"
        torch.testing.assert_close(layer.lora_A["weight"], theirs[f"{prefix}.lora_A.default.weight"], rtol=0,
                                   atol=1e-6)
        torch.testing.assert_close(layer.lora_B["weight"], theirs[f"{prefix}.lora_B.default.weight"], rtol=0,
                                   atol=1e-6)
        torch.testing.assert_close(layer.base_layer.weight, theirs[f"{prefix}.base_layer.weight"], rtol=0, atol=1e-6)
    ids = torch.randint(2, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(ours.model, ids), logits(tiny_llama(), ids), rtol=0, atol=1e-5)  # unchanged
    torch.manual_seed(2)  # the same "trained" weights in both
    with torch.no_grad():
        for name, layer in ours.layers.items():
            for kind in ("lora_A", "lora_B"):
                step = 0.05 * torch.randn_like(getattr(layer, kind)["weight"])
                getattr(layer, kind)["weight"].add_(step)
                theirs[f"base_model.model.{name}.{kind}.default.weight"].add_(step)
    torch.testing.assert_close(logits(ours.model, ids), logits(reference.eval(), ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_peft_folder_with_that_init_imports_onto_the_untouched_base(init, tmp_path):
    _, reference = both(init)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    reference.save_pretrained(tmp_path / "peft")
    ids = torch.randint(2, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = logits(reference.eval(), ids)
    model = tiny_llama()
    method, record = load_adapter(model, tmp_path / "peft")
    assert record["method"] == "lora" and method.config.init == init
    torch.testing.assert_close(logits(model.eval(), ids), expected, rtol=0, atol=1e-5)
