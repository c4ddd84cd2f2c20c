"""Prefix tuning on tiny GPT-2 and tiny Llama (GQA): trainable set, training, save/load, fold, and PEFT parity."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import MODEL_FACTORIES, VOCAB, peft_greedy_by_forward
from safetensors.torch import load_file, save_file
from torch import nn

import peftlab.methods.prefix_tuning  # noqa: F401  registers "prefix-tuning"
from peftlab.config import ConfigError
from peftlab.evaluation.generate import greedy_generate
from peftlab.methods import get_method
from peftlab.methods.prefix_tuning import PROMPT_KEY, PrefixTuningMethod, kv_shape
from peftlab.models.arch import output_head
from peftlab.training.loss import target_hidden_states, target_only_loss

peft = pytest.importorskip("peft")

FAMILIES = sorted(MODEL_FACTORIES)
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]



def build(family: str, **options) -> PrefixTuningMethod:
    spec = get_method("prefix-tuning")
    torch.manual_seed(2)
    return spec.apply(MODEL_FACTORIES[family](), spec.build_config({"n_tokens": 3, "hidden_size": 16, **options}))


@torch.no_grad()
def logits(method: PrefixTuningMethod, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Full logits (B, T, V) through the generation-style forward (``model(**inputs)``)."""
    return method.model(**method.prepare_inputs(batch["input_ids"], batch["attention_mask"])).logits


def test_registered_with_paper_and_lr():
    spec = get_method("prefix-tuning")
    assert spec.paper == "https://arxiv.org/abs/2101.00190"
    assert spec.default_lr == 3e-4  # suits the default MLP reparametrization (see the spec's comment)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reparametrize", [True, False])
def test_only_the_prefix_trains_with_the_exact_count(family, reparametrize):
    method = build(family, reparametrize=reparametrize)
    cfg = method.model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    k = kv_heads * (cfg.hidden_size // heads)  # GPT-2: 32; Llama GQA: 2 heads * 8 = 16
    n, layers, h = 3, cfg.num_hidden_layers, 16
    flat = layers * 2 * k
    expected = n * k + (k * h + h) + (h * flat + flat) if reparametrize else n * flat
    trainable = method.trainable_parameters()
    assert sum(p.numel() for p in trainable.values()) == expected
    requires_grad = {id(p) for p in method.model.parameters() if p.requires_grad}
    assert requires_grad == {id(p) for p in trainable.values()}
    assert kv_shape(method.model).kv_dim == k


@pytest.mark.parametrize("family", FAMILIES)
def test_prepare_inputs_shapes(family, batch):
    method = build(family)
    out = method.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"])
    s, b = method.shape, batch["input_ids"].shape[0]
    assert torch.equal(out["input_ids"], batch["input_ids"]) and torch.equal(out["labels"], batch["labels"])
    ones = torch.ones(b, 3, dtype=torch.long)
    assert torch.equal(out["attention_mask"], torch.cat([ones, batch["attention_mask"]], dim=1))  # (B, n + T)
    cache = out["cache"]
    assert cache.get_seq_length() == 3 and len(cache.layers) == s.n_layers
    prefix = method.encoder().detach().view(3, s.n_layers, 2, s.n_kv_heads, s.head_dim)
    for layer in range(s.n_layers):
        assert cache.layers[layer].keys.shape == (b, s.n_kv_heads, 3, s.head_dim)
        torch.testing.assert_close(cache.layers[layer].values[1], prefix[:, layer, 1].transpose(0, 1))
    # A fresh cache per call: the model appends to it.
    assert method.prepare_inputs(batch["input_ids"], None)["cache"] is not cache


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reparametrize", [True, False])
def test_ten_adamw_steps_lower_the_loss(family, reparametrize, batch):
    method = build(family, reparametrize=reparametrize)  # eval mode: no dropout noise in a 10-step comparison
    # A tiny random model needs a large step to show a drop within 10 steps; SmolLM2 wants the default 3e-4.
    optimizer = torch.optim.AdamW(method.trainable_parameters().values(), lr=1e-2)
    losses = []
    for _ in range(11):
        loss, count = target_only_loss(method.model, method.prepare_inputs(**batch))
        losses.append(loss.item() / count)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Tiny random models start near log(96) and learn slowly through a prefix; the drop is ~0.01-0.1 nats.
    assert losses[-1] < losses[0] - 5e-3, losses


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_gives_identical_logits(family, batch, tmp_path):
    method = build(family)
    with torch.no_grad():
        for p in method.trainable_parameters().values():
            p.add_(0.1 * torch.randn_like(p))
    save_file(method.adapter_state_dict(), tmp_path / "adapter.safetensors")
    fresh = build(family)  # same seed: perturbation above is what must travel through the file
    assert not torch.equal(logits(fresh, batch), logits(method, batch))
    fresh.load_adapter_state_dict(load_file(tmp_path / "adapter.safetensors"))
    assert torch.equal(logits(fresh, batch), logits(method, batch))


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_keeps_logits_and_shrinks_the_adapter(family, batch, tmp_path):
    method = build(family)
    before, unfolded_state = logits(method, batch), method.adapter_state_dict()
    assert method.describe()["folded"] is False
    method.after_training()  # drop_mlp_after_training defaults to true
    assert method.describe()["folded"] is True
    folded_state = method.adapter_state_dict()
    assert set(folded_state) == {PROMPT_KEY}
    assert sum(v.numel() for v in folded_state.values()) < sum(v.numel() for v in unfolded_state.values())
    torch.testing.assert_close(logits(method, batch), before, atol=1e-6, rtol=0)
    assert set(method.trainable_parameters()) == {PROMPT_KEY}
    # A folded file loads into a fresh (unfolded) method, and an unfolded file into a folded one.
    fresh = build(family, hidden_size=16)
    with torch.no_grad():
        fresh.encoder.embedding.weight.zero_()
    fresh.load_adapter_state_dict(folded_state)
    assert fresh.folded and torch.equal(logits(fresh, batch), logits(method, batch))
    other = build(family, reparametrize=False)
    other.load_adapter_state_dict(unfolded_state)
    torch.testing.assert_close(logits(other, batch), before, atol=1e-6, rtol=0)


def test_fold_is_skipped_when_asked():
    method = build("llama", drop_mlp_after_training=False)
    method.after_training()
    assert not method.folded


def peft_pair(family: str, projection: bool) -> tuple[nn.Module, PrefixTuningMethod]:
    """A PEFT prefix-tuning model and ours on the same base, holding the same prefix encoder weights."""
    torch.manual_seed(4)
    reference = peft.get_peft_model(
        MODEL_FACTORIES[family](),
        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection,
                                encoder_hidden_size=16),
    ).eval()
    ours = build(family, reparametrize=projection)
    encoder = reference.prompt_encoder["default"]
    if projection:
        ours.load_adapter_state_dict(encoder.state_dict())
    else:
        ours.load_adapter_state_dict({PROMPT_KEY: encoder.embedding.weight.detach() * 0.5})
        with torch.no_grad():
            encoder.embedding.weight.mul_(0.5)  # a gentler prefix keeps the tiny models' greedy output varied
    return reference, ours


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("projection", [False, True])
def test_same_logits_as_peft(family, projection, batch):
    reference, ours = peft_pair(family, projection)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base = ours.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert (base - expected)[real].abs().max() > 1e-3  # the prefix changes the output
        torch.testing.assert_close(logits(ours, batch)[real], expected[real], atol=1e-5, rtol=0)
        # The training path (trunk + head on labelled positions) sees the same prefix and positions.
        hidden, _ = target_hidden_states(ours.model, ours.prepare_inputs(**batch))
        picked = (batch["labels"][:, 1:] != -100)
        torch.testing.assert_close(output_head(ours.model)(hidden), expected[:, :-1][picked], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("projection", [False, True])
def test_greedy_generate_matches_peft_step_by_step(family, projection):
    reference, ours = peft_pair(family, projection)
    prompt = [5, 9, 17, 33, 40]
    got = greedy_generate(ours, [prompt], pad_id=1, eos_ids={VOCAB + 1}, max_new_tokens=8,
                          device=torch.device("cpu"))[0]
    # PEFT's forward pass step by step, not its generate(), which transformers 5.24 broke for prefix tuning (see
    # peft_greedy_by_forward).
    expected_tokens, expected_logits = peft_greedy_by_forward(reference, torch.tensor([prompt]), 8)
    expected_tokens, expected_logits = expected_tokens[0].tolist(), expected_logits[0]
    assert got == expected_tokens
    # Tiny tied-embedding models tend to repeat a token, so the tokens alone are a weak check: PEFT's per-step
    # logits must also equal ours for the full sequence with the prefix at positions 0..n-1 (tokens from n on).
    full = torch.tensor([prompt + expected_tokens[:-1]])
    got_logits = logits(ours, {"input_ids": full, "attention_mask": torch.ones_like(full)})[0, 4:]
    torch.testing.assert_close(got_logits, expected_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("options", "key"), [
    ({"n_tokens": 0}, "method.n_tokens"),
    ({"n_tokens": 2.5}, "method.n_tokens"),
    ({"reparametrize": "yes"}, "method.reparametrize"),
    ({"hidden_size": 0}, "method.hidden_size"),
    ({"drop_mlp_after_training": 1}, "method.drop_mlp_after_training"),
    ({"prefix_projection": True}, "method.prefix_projection"),
])
def test_bad_options_raise_naming_the_key(options, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        get_method("prefix-tuning").build_config(options)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_gradient_checkpointing_is_refused_pointing_to_ours(family, batch):
    """Hugging Face's checkpointing drops the cache that holds the prefixes; peftlab's own (train.gradient_
    checkpointing, tests/test_checkpointing.py) keeps it."""
    method = build(family)
    method.model.gradient_checkpointing_enable()
    method.model.train()
    with pytest.raises(ValueError, match="use train.gradient_checkpointing=true"):
        method.prepare_inputs(**batch)
    method.model.eval()  # checkpointing is inactive in eval mode, so inference still works
    assert logits(method, batch).shape == (3, 12, VOCAB)
    model = MODEL_FACTORIES[family]()
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        get_method("prefix-tuning").apply(model, get_method("prefix-tuning").build_config({}))


def test_fp32_prefix_under_bf16_autocast(batch):
    method = build("llama", reparametrize=False)
    method.model.train()
    inputs = method.prepare_inputs(**batch)  # built outside autocast, as the trainer does
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = target_only_loss(method.model, inputs)
    loss.backward()
    assert torch.isfinite(loss) and method.encoder.prompt_embeddings.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_no_deprecated_cache_keyword(family, batch):
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` and drops the old name in 5.40: our training and
    generation paths must not use it (PEFT's own forward still does; that is theirs)."""
    method = build(family)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*", category=FutureWarning)
        method.model.train()
        loss, _ = target_only_loss(method.model, method.prepare_inputs(**batch))
        loss.backward()
        method.model.eval()
        greedy_generate(method, [[5, 9, 17]], pad_id=1, eos_ids={VOCAB + 1}, max_new_tokens=3,
                        device=torch.device("cpu"))
