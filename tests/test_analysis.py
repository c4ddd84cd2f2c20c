"""peftlab analyze: LoRA subspace similarity and amplification (Hu et al. 2021), soft-prompt nearest tokens, and the
intrinsic-dimension d90 sweep (Aghajanyan et al. 2020), each against a direct computation or a known answer."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from peftlab.analysis import commands
from peftlab.analysis.adapters import LoraFactors, read_lora
from peftlab.analysis.amplification import amplification_for_model, amplification_stats, base_rows, update_of
from peftlab.analysis.intrinsic_dim import d90, d90_interpolated, parse_dims, run_from_results, run_sweep
from peftlab.analysis.prompt_tokens import nearest_tokens, prompt_tokens_for_model, run_prompt_tokens
from peftlab.analysis.subspace import run_subspace, shown_layers, subspace_basis, subspace_similarity
from peftlab.config import ConfigError
from peftlab.methods import get_method
from peftlab.methods.io import save_adapter
from peftlab.models.arch import arch_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")


def saved(model, folder, method: str, seed: int = 0, **options):
    """Apply ``method`` to ``model``, give LoRA's B random values (so delta W != 0), save the adapter."""
    fingerprint = arch_fingerprint(model)
    spec = get_method(method)
    torch.manual_seed(seed)
    applied = spec.apply(model, spec.build_config(options))
    with torch.no_grad():
        for name, p in applied.trainable_parameters().items():
            if ".lora_B." in name:  # test code may match names; the library never does
                p.normal_(0, 0.5)
    save_adapter(applied, method, folder, "tiny", fingerprint)
    return applied


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="peftlab")
    commands.add_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(list(argv))
    return ns.func(ns)


# ---- subspace similarity --------------------------------------------------------------------------------------


def factors(a: torch.Tensor, b: torch.Tensor | None = None) -> LoraFactors:
    return LoraFactors("m", "weight", a, b if b is not None else torch.zeros(5, a.shape[0]), 1.0)


def test_phi_matches_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    a1, a2 = rng.normal(size=(4, 20)), rng.normal(size=(6, 20))
    got = subspace_similarity(subspace_basis(factors(torch.tensor(a1))), subspace_basis(factors(torch.tensor(a2))))
    # The paper's U_A: right-singular vectors of A (r x d_in) = rows of Vh, ordered by decreasing singular value.
    u1, u2 = np.linalg.svd(a1)[2][:4].T, np.linalg.svd(a2)[2][:6].T
    for i in range(1, 5):
        for j in range(1, 7):
            expected = np.linalg.norm(u1[:, :i].T @ u2[:, :j], "fro") ** 2 / min(i, j)
            assert got[i - 1, j - 1].item() == pytest.approx(expected, abs=1e-10)
    # B: left-singular vectors of B (d_out x r)
    b = rng.normal(size=(7, 3))
    assert np.allclose(np.abs(subspace_basis(factors(torch.tensor(a1[:3]), torch.tensor(b)), "B").numpy()),
                       np.abs(np.linalg.svd(b)[0][:, :3]))


def test_phi_of_an_adapter_with_itself_is_one_and_the_row_space_is_what_counts():
    a = torch.randn(8, 40, generator=torch.Generator().manual_seed(1))
    basis = subspace_basis(factors(a))
    phi = subspace_similarity(basis, basis)
    torch.testing.assert_close(phi, torch.ones(8, 8, dtype=torch.float64))
    mixed = torch.randn(8, 8, generator=torch.Generator().manual_seed(2)) @ a  # same row space, other directions
    phi_mixed = subspace_similarity(basis, subspace_basis(factors(mixed)))
    assert phi_mixed[-1, -1].item() == pytest.approx(1.0, abs=1e-10)
    assert phi_mixed[0, 0].item() < 0.99  # the strongest directions differ


def test_independent_random_subspaces_sit_at_chance_level():
    """E ||U_i^T U_j||_F^2 = i j / d; each of the i columns' captured energy is Beta(j/2, (d-j)/2)."""
    d = 512
    gen = torch.Generator().manual_seed(3)
    phi = subspace_similarity(subspace_basis(factors(torch.randn(8, d, generator=gen))),
                              subspace_basis(factors(torch.randn(64, d, generator=gen))))
    for i, j in [(1, 1), (1, 64), (4, 16), (8, 8), (8, 64)]:
        captured = phi[i - 1, j - 1].item() * min(i, j)
        sd = math.sqrt(i * (j / d) * (1 - j / d) * 2 / (d + 2))  # i independent Beta variances (an upper bound)
        assert abs(captured - i * j / d) < 5 * sd + 1e-3, (i, j, captured)
    assert (phi >= 0).all() and (phi <= 1 + 1e-12).all()


def test_subspace_of_saved_gpt2_adapters_writes_json_and_png(tmp_path):
    saved(tiny_gpt2(), tmp_path / "r2", "lora", r=2, target_modules=["q", "v"])
    saved(tiny_gpt2(), tmp_path / "r4", "lora", seed=1, r=4, target_modules=["q", "v"])
    assert cli("analyze", "subspace", str(tmp_path / "r2"), str(tmp_path / "r4"), "--out", str(tmp_path / "out"),
               "--layers", "all") == 0
    data = json.loads((tmp_path / "out" / "subspace.json").read_text())
    assert (tmp_path / "out" / data["figure"]).stat().st_size > 0
    assert sorted((e["kind"], e["layer"]) for e in data["modules"]) == [
        ("c_attn[q]", 0), ("c_attn[q]", 1), ("c_attn[v]", 0), ("c_attn[v]", 1)]
    assert all(np.shape(e["phi"]) == (2, 4) and e["dim"] == 32 for e in data["modules"])
    assert set(data["mean_over_layers"]) == set(data["summary"]) == {"c_attn[q]", "c_attn[v]"}
    summary = data["summary"]["c_attn[q]"]
    assert summary["n_layers"] == 2 and summary["random_1_1"] == pytest.approx(1 / 32)
    assert summary["phi_1_all"] == pytest.approx(np.mean([e["phi"][0][-1] for e in data["modules"]
                                                          if e["kind"] == "c_attn[q]"]))
    # the same adapter twice: every phi is 1
    same = json.loads(run_subspace(tmp_path / "r2", tmp_path / "r2", tmp_path / "out", "same").read_text())
    assert all(np.allclose(e["phi"], 1.0) for e in same["modules"])
    with pytest.raises(ValueError, match="not adapted in both"):
        run_subspace(tmp_path / "r2", tmp_path / "r4", tmp_path / "out", layers=[7])


def test_figure_layers_default_to_six_evenly_spaced():
    entries = [{"layer": i} for i in range(30)] + [{"layer": None}]
    assert shown_layers(entries, None) == [0, 6, 12, 17, 23, 29]
    assert shown_layers(entries, "all") == list(range(30))
    assert shown_layers(entries[:4], None) == [0, 1, 2, 3]


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft 0.21, hf 5
def test_peft_format_adapters_read_like_ours(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                             lora_dropout=0.0))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "peft")
    ours = saved(tiny_llama(), tmp_path / "ours", "lora", r=4, alpha=8.0, target_modules=["q", "v"])
    state = {k.removeprefix("base_model.model."): v for k, v in peft.get_peft_model_state_dict(model).items()}
    ours.load_adapter_state_dict(state)  # the same weights in our format
    save_adapter(ours, "lora", tmp_path / "ours", "tiny", arch_fingerprint(tiny_llama()))
    adapter, peft_factors = read_lora(tmp_path / "peft")
    assert adapter.format == "peft" and len(peft_factors) == 4
    data = json.loads(run_subspace(tmp_path / "peft", tmp_path / "ours", tmp_path / "out").read_text())
    assert len(data["modules"]) == 4 and all(np.allclose(e["phi"], 1.0) for e in data["modules"])
    a = amplification_for_model(tmp_path / "peft", tiny_llama())
    b = amplification_for_model(tmp_path / "ours", tiny_llama())
    assert [e["norm_delta"] for e in a["modules"]] == pytest.approx([e["norm_delta"] for e in b["modules"]])


def test_a_non_lora_adapter_is_refused_by_name(tmp_path):
    saved(tiny_llama(), tmp_path / "pt", "prompt-tuning", n_tokens=2)
    with pytest.raises(ValueError, match="needs a LoRA adapter.*prompt-tuning"):
        read_lora(tmp_path / "pt")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        read_lora(tmp_path)


# ---- amplification ---------------------------------------------------------------------------------------------


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_amplification_of_a_hand_built_update():
    """W = U0 diag(w) V0^T + Uc diag(c) Vc^T with c > w; delta W = U0 diag(s) V0^T: every number is known."""
    d_out, d_in, r = 24, 16, 3
    u, v = orthonormal(d_out, 2 * r, 0), orthonormal(d_in, 2 * r, 1)
    u0, uc, v0, vc = u[:, :r], u[:, r:], v[:, :r], v[:, r:]
    w_small, w_big, s = torch.tensor([0.3, 0.2, 0.1]), torch.tensor([9.0, 8.0, 7.0]), torch.tensor([4.0, 2.0, 1.0])
    weight = u0 @ torch.diag(w_small).double() @ v0.T + uc @ torch.diag(w_big).double() @ vc.T
    scaling = 2.0
    f = LoraFactors("m", "weight", v0.T.float(), (u0 @ torch.diag(s).double()).float() / scaling, scaling)
    delta = update_of(f, weight)
    torch.testing.assert_close(delta, u0 @ torch.diag(s).double() @ v0.T, atol=1e-6, rtol=0)
    stats = amplification_stats(delta, weight, r, torch.Generator().manual_seed(0))
    assert stats["proj_delta"] == pytest.approx(float(w_small.norm()), rel=1e-5)
    assert stats["proj_weight"] == pytest.approx(float(w_big.norm()), rel=1e-6)
    assert stats["norm_delta"] == pytest.approx(float(s.norm()), rel=1e-6)
    assert stats["norm_weight"] == pytest.approx(float(torch.cat([w_small, w_big]).norm()), rel=1e-6)
    assert stats["amplification"] == pytest.approx(float(s.norm() / w_small.norm()), rel=1e-5)
    # random directions: E ||U^T W V||^2 = ||W||^2 r^2 / (d_out d_in) ~ 0.34^2; far below W's own top-r
    assert 0 < stats["proj_random"] < 0.3 * stats["proj_weight"]


@pytest.mark.parametrize(("factory", "targets", "dora"), [
    (tiny_gpt2, ["q", "v"], False), (tiny_gpt2, ["c_attn"], True), (tiny_llama, ["q", "v", "down"], False)])
def test_amplification_reads_the_right_base_rows(tmp_path, factory, targets, dora):
    """delta W from the adapter file + the base rows equals what merging the method writes into the weights."""
    model = factory()
    method = saved(model, tmp_path / "a", "lora", r=2, target_modules=targets, use_dora=dora)
    before = {name: layer.base_layer.weight.detach().clone() for name, layer in method.layers.items()}
    method.merge()
    base = factory()
    data = amplification_for_model(tmp_path / "a", base)
    assert len(data["modules"]) == sum(len(layer.slices) for layer in method.layers.values())
    _, lora = read_lora(tmp_path / "a")
    for f, entry in zip(lora, data["modules"], strict=True):
        layer = method.layers[f.module]
        change = layer.base_layer.weight.detach() - before[f.module]
        change = change.T if layer.fan_in_fan_out else change  # -> (out, in)
        start, stop = layer.slices[f.branch]
        torch.testing.assert_close(update_of(f, base_rows(base, f)).float(), change[start:stop], atol=1e-5, rtol=0)
        assert entry["norm_delta"] == pytest.approx(float(change[start:stop].norm()), rel=1e-4)
        assert entry["proj_delta"] <= entry["proj_weight"] + 1e-9 and entry["dora"] is dora


# ---- prompt tokens ---------------------------------------------------------------------------------------------


def test_prompt_initialised_from_token_ids_is_nearest_to_them(tmp_path):
    ids = [5, 17, 42, 5]
    model = tiny_llama()
    method = saved(model, tmp_path / "pt", "prompt-tuning", n_tokens=4, init="text", init_token_ids=ids)
    nearest, cos = nearest_tokens(method.prompt.detach(), model.get_input_embeddings().weight, k=3)
    assert nearest[:, 0].tolist() == ids
    torch.testing.assert_close(cos[:, 0], torch.ones(4), atol=1e-6, rtol=0)
    assert (cos[:, 1] < 1 - 1e-4).all()
    report = prompt_tokens_for_model(tmp_path / "pt", tiny_llama(), k=3)
    assert [e["nearest"][0]["id"] for e in report["tokens"]] == ids
    assert [e["init"]["rank"] for e in report["tokens"]] == [1, 1, 1, 1]


def test_prompt_tokens_writes_decoded_tokens(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tokenizer("hello world", add_special_tokens=False).input_ids
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    fingerprint = arch_fingerprint(model)
    spec = get_method("prompt-tuning")
    method = spec.apply(model, spec.build_config({"n_tokens": len(ids), "init": "text", "init_token_ids": ids}))
    save_adapter(method, "prompt-tuning", tmp_path / "pt", str(tiny_llama_dir), fingerprint)
    data = json.loads(run_prompt_tokens(tmp_path / "pt", tmp_path / "out", k=2).read_text())
    assert "".join(e["nearest"][0]["token"] for e in data["tokens"]) == "hello world"
    assert (tmp_path / "out" / "prompt_tokens.png").stat().st_size > 0


# ---- intrinsic dimension: d90 ----------------------------------------------------------------------------------


def test_d90_is_the_smallest_d_reaching_90_percent():
    assert d90({10: 20.0, 100: 50.0, 1000: 89.0, 10000: 95.0}, 100.0) == 10000
    assert d90({10: 20.0, 100: 90.0, 1000: 85.0}, 100.0) == 100  # the first d that reaches it, even if later dips
    assert d90({10: 20.0, 100: 50.0}, 100.0) is None
    assert d90_interpolated({100: 80.0, 1000: 100.0}, 100.0) == pytest.approx(10**2.5)
    assert d90_interpolated({100: 95.0, 1000: 100.0}, 100.0) is None  # reached at the first point: no bracket
    assert parse_dims("1000,10, 100,1e2") == [10, 100, 1000]
    with pytest.raises(ConfigError, match="--d"):
        parse_dims("10,abc")


def test_cli_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="--d is required"):
        cli("analyze", "intrinsic-dim", "task=table-to-text")
    with pytest.raises(ConfigError, match="--from summarizes finished runs"):
        cli("analyze", "intrinsic-dim", "--from", str(tmp_path), "--d", "10")
    with pytest.raises(ConfigError, match="unexpected argument 'oops'"):
        cli("analyze", "intrinsic-dim", "oops", "--d", "10")
    with pytest.raises(ConfigError, match="--layers"):
        cli("analyze", "subspace", "a", "b", "--layers", "1,x")
    with pytest.raises(FileNotFoundError, match="no finished d<d>/result.json"):
        run_from_results(tmp_path, tmp_path / "out")
    lora_yaml = tmp_path / "lora.yaml"
    lora_yaml.write_text("method:\n  name: lora\n  r: 8\ntrain:\n  lr: 5.0e-4\n")
    with pytest.raises(ConfigError, match="sets method 'lora', but the sweep trains intrinsic-dim"):
        run_sweep(str(lora_yaml), [], [10], tmp_path)


def fake_result(d: int | None, bleu: float) -> dict:
    method = {"name": "intrinsic-dim", "options": {"d": d}} if d else {"name": "full", "options": {}}
    return {"run_info": {"config": {"task": {"name": "table-to-text"}, "method": method}},
            "train_info": {"lr": 1e-2, "trainable_params": d or 1000, "steps": 3},
            "metrics": {"validation": {"bleu": bleu - 1}, "test": {"bleu": bleu, "rougeL": 0.5, "n_examples": 4}}}


def test_d90_from_existing_result_files(tmp_path):
    sweep = tmp_path / "sweep"
    for name, d, bleu in [("d10", 10, 30.0), ("d100", 100, 46.0), ("d1000", 1000, 52.0), ("full", None, 50.0)]:
        (sweep / name).mkdir(parents=True)
        (sweep / name / "result.json").write_text(json.dumps(fake_result(d, bleu)))
    (sweep / "d5000").mkdir()  # unfinished: left out
    assert cli("analyze", "intrinsic-dim", "--from", str(sweep), "--out", str(tmp_path / "out")) == 0
    data = json.loads((tmp_path / "out" / "intrinsic_dim.json").read_text())
    assert data["metric"] == "bleu" and data["split"] == "test" and data["reference"]["metric"] == 50.0
    assert [p["d"] for p in data["points"]] == [10, 100, 1000] and data["d90"] == 100
    assert data["threshold"] == pytest.approx(45.0)
    assert (tmp_path / "out" / "intrinsic_dim.png").stat().st_size > 0
    given = json.loads(run_from_results(sweep, tmp_path / "out", reference_metric=55.0, split="validation",
                                        stem="given").read_text())
    assert given["d90"] == 1000 and given["reference"]["source"] == "given"
    with pytest.raises(ValueError, match="no metric 'accuracy'.*available: bleu, rougeL"):
        run_from_results(sweep, tmp_path / "out", metric="accuracy")


def test_tiny_sweep_end_to_end_and_reuse(tiny_llama_dir, tmp_path, monkeypatch):
    base = [f"model={tiny_llama_dir}", "task=table-to-text", "data=demo", "data.max_train=8", "data.max_validation=2",
            "data.max_test=2", "eval.max_new_tokens=4", "train.max_steps=2", "train.batch_size=4",
            "train.eval_examples=0", "eval.show_examples=1", "method.target_modules=[q, v]"]
    path = run_sweep(None, base, [4, 16], tmp_path, scale_lr_at=4)
    data = json.loads(path.read_text())
    assert [p["d"] for p in data["points"]] == [4, 16]
    assert [p["trainable_params"] for p in data["points"]] == [4, 16]
    assert data["points"][0]["D"] == data["points"][1]["D"] == 2 * (32 * 32 + 32 * 16)  # q and v of 2 blocks
    assert data["points"][1]["lr"] == pytest.approx(data["points"][0]["lr"] / 2)  # lr * sqrt(4 / 16)
    assert data["reference"]["source"].endswith("full/result.json") and data["metric"] == "bleu"
    assert data["d90"] == d90({p["d"]: p["metric"] for p in data["points"]}, data["reference"]["metric"])
    assert (tmp_path / "intrinsic-dim" / "d16" / "adapter" / "adapter.safetensors").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("peftlab.analysis.intrinsic_dim.train_run", no_training)
    again = json.loads(run_sweep(None, base, [4, 16], tmp_path, scale_lr_at=4, stem="again").read_text())
    assert again["points"] == data["points"] and again["reference"] == data["reference"]
    with pytest.raises(ConfigError, match="different config.*train.max_steps"):
        run_sweep(None, [*base[:-5], "train.max_steps=3", *base[-4:]], [4], tmp_path)
    interrupted = tmp_path / "intrinsic-dim" / "d8"  # started (config.json), unfinished, and not for d=8
    interrupted.mkdir()
    (interrupted / "config.json").write_text((tmp_path / "intrinsic-dim" / "d4" / "config.json").read_text())
    with pytest.raises(ConfigError, match="d8/config.json was trained with a different config.*method.options.d"):
        run_sweep(None, base, [8], tmp_path, scale_lr_at=4)
    with pytest.raises(ConfigError, match="sets method=intrinsic-dim and method.d"):
        run_sweep(None, [*base, "method.d=8"], [4], tmp_path)
