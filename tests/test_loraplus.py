"""LoRA+ (``method.loraplus_lr_ratio``): B trains at ratio * lr and A at lr, checked against AdamW's first step
written out; the schedule scales both rates alike; checkpoints and resume keep the groups."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_FACTORIES, toy_examples

from peftlab.config import TrainConfig
from peftlab.methods.base import ParamGroup
from peftlab.options import ConfigError
from peftlab.registry import get_method
from peftlab.training.schedule import lr_lambda
from peftlab.training.trainer import Interrupt, Trainer

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]
LR, RATIO = 1e-3, 16.0


def lora(**options):
    spec = get_method("lora")
    method = spec.apply(MODEL_FACTORIES["llama"](), spec.build_config({"r": 4, **options}))
    torch.manual_seed(3)
    with torch.no_grad():  # B off zero, so A has a gradient at the first step too
        for p in method.trainable_parameters().values():
            p.add_(0.05 * torch.randn_like(p))
    return method


def trainer(method, out, on_step=None, **cfg) -> Trainer:
    settings = {"batch_size": 4, "max_steps": 4, "warmup_steps": 2, "save_every": 1, "log_every": 1, "seed": 0,
                **cfg}
    torch.manual_seed(0)
    return Trainer(method, toy_examples(16, 0, 5), [], TrainConfig(**settings), out, pad_id=1, lr=LR,
                   on_step=on_step)


def test_groups_split_a_from_b_and_dora_magnitudes():
    method = lora(use_dora=True, loraplus_lr_ratio=RATIO)
    slow, fast = method.param_groups()
    assert (slow.name, slow.lr_scale, fast.name, fast.lr_scale) == ("lora_A", 1.0, "lora_B", RATIO)
    assert slow.params and all(".lora_A." in k for k in slow.params)
    assert fast.params and all(".lora_B." in k or k.endswith(".lora_magnitude_vector") for k in fast.params)
    assert any(k.endswith(".lora_magnitude_vector") for k in fast.params)
    assert sorted([*slow.params, *fast.params]) == sorted(method.trainable_parameters())
    assert [g.name for g in lora().param_groups()] == ["all"]  # ratio 1: plain LoRA's single group


def test_one_adamw_step_moves_b_at_ratio_times_lr_and_a_at_lr(tmp_path):
    """AdamW's first step written out: p1 = p0 (1 - lr_g wd) - lr_g g / (|g| + eps), lr_g = scale * lr * f(0),
    where the warmup factor f(0) = 1/3 with 2 warmup steps (the schedule scales both groups)."""
    method = lora(loraplus_lr_ratio=RATIO)
    run = trainer(method, tmp_path, max_steps=1, weight_decay=0.1)
    before = {k: p.detach().clone() for k, p in run.params.items()}
    grads: dict[str, torch.Tensor] = {}
    run.optimizer.register_step_pre_hook(
        lambda *_: grads.update({k: p.grad.detach().clone() for k, p in run.params.items()}))
    run.fit()
    factor = lr_lambda("linear", 2, 1)(0)
    assert factor == pytest.approx(1 / 3)
    for key, p in run.params.items():
        lr = LR * factor * (RATIO if ".lora_B." in key else 1.0)
        g = grads[key]
        expected = before[key] * (1 - lr * 0.1) - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=key)
    moved = {k: (run.params[k] - before[k]).abs().max().item() for k in run.params}
    assert max(v for k, v in moved.items() if ".lora_B." in k) > 10 * max(v for k, v in moved.items()
                                                                          if ".lora_A." in k)


def test_the_schedule_scales_every_group_s_own_rate(tmp_path):
    seen: list[list[float]] = []
    run = trainer(lora(loraplus_lr_ratio=RATIO), tmp_path, on_step=lambda s: seen.append(
        [g["lr"] for g in run.optimizer.param_groups]))
    assert [g["lr"] for g in run.optimizer.param_groups] == pytest.approx([LR / 3] * 2 + [RATIO * LR / 3] * 2)
    run.fit()
    factor = lr_lambda("linear", 2, 4)
    for step, lrs in enumerate(seen, start=1):  # after step k the scheduler holds f(k)
        assert lrs == pytest.approx([LR * factor(step)] * 2 + [RATIO * LR * factor(step)] * 2)
    assert [g["initial_lr"] for g in run.optimizer.param_groups] == [LR, LR, RATIO * LR, RATIO * LR]


def test_resume_keeps_the_groups_and_gives_the_same_weights(tmp_path):
    straight = trainer(lora(loraplus_lr_ratio=RATIO), tmp_path / "a")
    straight.fit()

    def crash(state):
        if state.step == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        trainer(lora(loraplus_lr_ratio=RATIO), tmp_path / "b", on_step=crash).fit()
    resumed = trainer(lora(loraplus_lr_ratio=RATIO), tmp_path / "b")
    assert resumed.resume() and resumed.state.step == 2
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx(
        [LR * lr_lambda("linear", 2, 4)(2) * s for s in (1, 1, RATIO, RATIO)])
    resumed.fit()
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [g["lr"] for g in straight.optimizer.param_groups]
    for name, p in straight.params.items():
        torch.testing.assert_close(resumed.params[name], p, rtol=0, atol=0, msg=name)


def test_groups_that_do_not_partition_the_trainable_parameters_are_refused(tmp_path):
    method = lora(loraplus_lr_ratio=RATIO)
    params = method.trainable_parameters()
    method.param_groups = lambda: [ParamGroup("half", dict(list(params.items())[:2]))]
    with pytest.raises(ValueError, match="do not partition"):
        trainer(method, tmp_path)


@pytest.mark.parametrize(("ratio", "message"), [(0, "must be a number > 0"), (-2, "must be a number > 0"),
                                                (float("inf"), "expected a number")])
def test_a_bad_ratio_names_the_key(ratio, message):
    with pytest.raises(ConfigError, match=f"method.loraplus_lr_ratio: {message}"):
        get_method("lora").build_config({"loraplus_lr_ratio": ratio})


def test_describe_records_the_ratio():
    assert lora(loraplus_lr_ratio=RATIO).describe()["loraplus_lr_ratio"] == RATIO
    assert "loraplus_lr_ratio" not in lora().describe()
