"""Every registered method through the behaviours every method must have, from the one table in method_cases.py.

* save -> load on a fresh base gives identical logits;
* an interrupted run resumed from its checkpoint ends with the same weights as an uninterrupted one;
* the trainable count computed from the model config alone (the budget solver's) equals the built one;
* where the method has a PEFT converter: the export loads in PEFT with the same logits, and imports back;
* where the method has a merge rule: merged logits equal unmerged ones, and unmerging restores the base weights.
"""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_FACTORIES, toy_examples
from method_cases import CASES, MethodCase, case_of, method_params, registered
from torch import nn

from peftlab.config import TrainConfig
from peftlab.interop.adapter_files import load_adapter
from peftlab.methods.base import PeftMethod
from peftlab.methods.budget import count_trainable
from peftlab.methods.io import save_adapter
from peftlab.models.arch import arch_fingerprint
from peftlab.models.shape import model_shape
from peftlab.registry import get_method
from peftlab.training.trainer import Interrupt, Trainer

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
                                         "ignore::UserWarning", "ignore:`past_key_values` is deprecated")]


def build(case: MethodCase, family: str, perturb: bool = True) -> PeftMethod:
    """The case's method on a fresh tiny model, its trainable weights moved off their init (so it changes logits)."""
    spec = get_method(case.method)
    method = spec.apply(MODEL_FACTORIES[family](), spec.build_config(dict(case.options)))
    if perturb:
        torch.manual_seed(3)
        with torch.no_grad():
            for p in method.trainable_parameters().values():
                p.add_(0.05 * torch.randn_like(p))
    method.model.eval()
    return method


def real_logits(model: nn.Module, method: PeftMethod | None) -> torch.Tensor:
    """Logits of the real tokens of a fixed padded batch, (n_real, V) (virtual positions dropped)."""
    torch.manual_seed(1)
    ids = torch.randint(2, 96, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        kwargs = method.prepare_inputs(ids, mask) if method else {"input_ids": ids, "attention_mask": mask}
        out = model(**kwargs).logits
    return out[:, -ids.shape[1]:][mask.bool()]


def test_every_case_names_a_registered_method():
    names = {spec.name for spec in registered()}
    assert {case.method for case in CASES.values()} <= names


@pytest.mark.parametrize(("case_id", "family"), method_params())
def test_save_then_load_gives_identical_logits(case_id, family, tmp_path):
    case = case_of(case_id, family)
    base = MODEL_FACTORIES[family]()
    method = build(case, family)
    expected = real_logits(method.model, method)
    assert (expected - real_logits(base, None)).abs().max() > 1e-4  # the method does change the output
    folder = save_adapter(method, case.method, tmp_path / "adapter", "tiny", arch_fingerprint(base))
    fresh = MODEL_FACTORIES[family]()
    loaded, config = load_adapter(fresh, folder)
    assert config["method"] == case.method
    torch.testing.assert_close(real_logits(fresh.eval(), loaded), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("case_id", "family"), method_params())
def test_budget_count_equals_the_built_count(case_id, family):
    case = case_of(case_id, family)
    method = build(case, family, perturb=False)
    built = sum(p.numel() for p in method.trainable_parameters().values())
    assert built == sum(p.numel() for p in method.model.parameters() if p.requires_grad)
    shape = model_shape(MODEL_FACTORIES[family]().config)
    assert count_trainable(case.method, shape, dict(case.options)) == built


def _trainer(case: MethodCase, family: str, out, on_step=None) -> Trainer:
    method = build(case, family, perturb=False)
    cfg = TrainConfig(batch_size=4, max_steps=4, save_every=1, log_every=1, seed=0)
    torch.manual_seed(0)
    return Trainer(method, toy_examples(16, 0, 5), toy_examples(4, 1, 5), cfg, out, pad_id=1, lr=case.lr,
                   on_step=on_step)


@pytest.mark.parametrize(("case_id", "family"), method_params())
def test_resume_gives_the_same_weights(case_id, family, tmp_path):
    case = case_of(case_id, family)
    straight = _trainer(case, family, tmp_path / "a")
    before = {k: p.detach().clone() for k, p in straight.params.items()}
    straight.fit()
    assert any(not torch.equal(before[k], p) for k, p in straight.params.items())  # training moved the weights

    def crash(state):
        if state.step == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        _trainer(case, family, tmp_path / "b", on_step=crash).fit()
    resumed = _trainer(case, family, tmp_path / "b")
    assert resumed.resume() and resumed.state.step == 2
    resumed.fit()
    for name, p in straight.params.items():
        torch.testing.assert_close(resumed.params[name], p, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(("case_id", "family"), method_params(where=lambda spec: spec.peft is not None))
def test_peft_export_has_the_same_logits_in_peft_and_imports_back(case_id, family, tmp_path):
    peft = pytest.importorskip("peft")
    from peftlab.interop.export_peft import save_peft_adapter

    case = case_of(case_id, family)
    method = build(case, family)
    if case.peft_families is not None and family not in case.peft_families:
        from peftlab.interop.peft_format import PeftFormatError

        with pytest.raises(PeftFormatError, match="cannot be exported"):
            save_peft_adapter(method, case.method, tmp_path / "peft")
        return
    expected = real_logits(method.model, method)
    out = save_peft_adapter(method, case.method, tmp_path / "peft", base_model_name_or_path="tiny")
    reference = peft.PeftModel.from_pretrained(MODEL_FACTORIES[family](), out).eval()
    torch.testing.assert_close(real_logits(reference, None), expected, rtol=0, atol=1e-5)
    fresh = MODEL_FACTORIES[family]()
    imported, record = load_adapter(fresh, out)
    assert record["format"] == "peft" and record["method"] == case.method
    torch.testing.assert_close(real_logits(fresh.eval(), imported), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("case_id", "family"), method_params(where=lambda spec: bool(spec.merge_rule)))
def test_merge_equals_unmerged(case_id, family):
    case = case_of(case_id, family)
    method = build(case, family)
    base_state = {k: v.clone() for k, v in method.model.state_dict().items()}
    expected = real_logits(method.model, method)
    assert method.mergeable
    method.merge()
    torch.testing.assert_close(real_logits(method.model, method), expected, rtol=0, atol=1e-5)
    method.unmerge()
    torch.testing.assert_close(real_logits(method.model, method), expected, rtol=0, atol=1e-5)
    for key, value in method.model.state_dict().items():
        if key in base_state:
            torch.testing.assert_close(value, base_state[key], rtol=0, atol=1e-5, msg=key)


def test_the_base_model_handle_trains_nothing_and_keeps_the_dtype():
    """Zero-shot evaluation's handle: no trainable weights, the inputs untouched, a bf16 base left in bf16."""
    from peftlab.methods.base import BaseModelHandle

    model = MODEL_FACTORIES["llama"]().to(torch.bfloat16)
    handle = BaseModelHandle(model)
    assert handle.trainable_parameters() == {} and not handle.mergeable
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert handle.describe() == {"tied": True}
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    assert handle.prepare_inputs(ids, mask) == {"input_ids": ids, "attention_mask": mask}
