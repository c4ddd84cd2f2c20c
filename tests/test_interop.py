"""Interoperability with Hugging Face PEFT and transformers: export, import, eval adapter=PEFT_DIR, merge.

Every adapter here carries random (non-trivial) weights, so equal logits mean equal computations, not two
identity adapters. The reference is PEFT itself: ``PeftModel.from_pretrained`` for exports, ``get_peft_model`` +
``save_pretrained`` for imports, ``AutoModelForCausalLM`` for merged folders.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import MODEL_FACTORIES
from torch import nn
from transformers import AutoModelForCausalLM

import peftlab.cli
from peftlab.config import ModelConfig, load_config
from peftlab.interop.adapter_files import load_adapter, read_adapter_config
from peftlab.interop.commands import add_parsers
from peftlab.interop.export_peft import peft_export, save_peft_adapter
from peftlab.interop.merge import NotMergeableError, merge_adapter
from peftlab.interop.peft_format import OutputExistsError, PeftFormatError, exportable_methods
from peftlab.methods import PeftMethod, get_method
from peftlab.methods.io import AdapterMismatchError, save_adapter
from peftlab.models.arch import arch_fingerprint
from peftlab.models.loading import load_model_and_tokenizer

peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",  # peft 0.21 on transformers 5
        "ignore::UserWarning",  # PEFT warns about fan_in_fan_out and unset task types it corrects itself
    ),
    pytest.mark.usefixtures("one_thread"),
]



@pytest.fixture
def cli(monkeypatch):
    """``peftlab.cli.main`` with the export/import/merge sub-commands (added here until cli.py adds them itself)."""
    original = peftlab.cli.build_parser

    def build_parser() -> argparse.ArgumentParser:
        parser = original()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "merge" not in sub.choices:
            add_parsers(sub)
        return parser

    monkeypatch.setattr(peftlab.cli, "build_parser", build_parser)
    return peftlab.cli.main


def randomize(parameters: dict[str, nn.Parameter] | list[tuple[str, nn.Parameter]], seed: int = 5) -> None:
    """Random, non-trivial adapter weights: scales and magnitudes near their init, the rest O(0.3)."""
    torch.manual_seed(seed)
    items = parameters.items() if isinstance(parameters, dict) else parameters
    with torch.no_grad():
        for name, p in items:  # test code may match names; the library never does
            if "magnitude" in name or "ia3" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
            elif "prompt" in name or "embedding" in name:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))


def ours(family: str, method: str, options: dict) -> tuple[nn.Module, PeftMethod]:
    model = MODEL_FACTORIES[family]()
    spec = get_method(method)
    applied = spec.apply(model, spec.build_config(options))
    randomize(applied.trainable_parameters())
    return model, applied


def inputs(vocab: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(2, vocab, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding in the second row
    return ids, mask


def logits(model: nn.Module, method: PeftMethod | None, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits of the real tokens only (virtual prompt positions and padding dropped), (n_real, V)."""
    with torch.no_grad():
        kwargs = method.prepare_inputs(ids, mask) if method else {"input_ids": ids, "attention_mask": mask}
        out = model(**kwargs).logits
    return out[:, -ids.shape[1]:][mask.bool()]


def compare(expected: torch.Tensor, got: torch.Tensor, base: torch.Tensor | None = None) -> None:
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if base is not None:
        assert (expected - base).abs().max() > 1e-3  # the adapter does change the output


EXPORT_CASES = [
    ("llama", "lora", {"r": 2, "alpha": 4, "target_modules": ["q", "v"]}),
    ("llama", "lora", {"r": 2, "alpha": 4, "target_modules": "all-linear", "rslora": True, "use_dora": True}),
    ("gpt2", "lora", {"r": 2, "alpha": 4, "target_modules": ["q", "v"]}),  # slices -> one rank-2r c_attn LoRA
    ("gpt2", "lora", {"r": 2, "alpha": 4, "target_modules": ["q", "v", "o"], "rslora": True, "use_dora": True}),
    ("gpt2", "ia3", {}),  # k/v slices of c_attn (output) + mlp.c_proj (input)
    ("llama", "ia3", {}),
    ("llama", "prompt-tuning", {"n_tokens": 3}),
    ("llama", "prefix-tuning", {"n_tokens": 3}),  # unfolded MLP, grouped-query attention
    ("gpt2", "prefix-tuning", {"n_tokens": 3, "reparametrize": False}),
]


@pytest.mark.parametrize(("family", "method", "options"), EXPORT_CASES)
def test_export_loads_in_peft_and_imports_back_with_the_same_logits(tmp_path, family, method, options):
    model, applied = ours(family, method, options)
    out = save_peft_adapter(applied, method, tmp_path / "peft", base_model_name_or_path="some/base")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == {"lora": "LORA", "ia3": "IA3", "prompt-tuning": "PROMPT_TUNING",
                                   "prefix-tuning": "PREFIX_TUNING"}[method]
    assert config["base_model_name_or_path"] == "some/base"
    reference = peft.PeftModel.from_pretrained(MODEL_FACTORIES[family](), out).eval()
    ids, mask = inputs()
    expected = logits(model, applied, ids, mask)
    compare(expected, logits(reference, None, ids, mask), base=logits(MODEL_FACTORIES[family](), None, ids, mask))
    again = MODEL_FACTORIES[family]()
    imported, record = load_adapter(again, out)  # the PEFT branch of load_adapter
    assert record["format"] == "peft" and record["method"] == method
    compare(expected, logits(again, imported, ids, mask))


def test_gpt2_slices_export_as_block_lora_and_rank_pattern():
    model, applied = ours("gpt2", "lora", {"r": 2, "alpha": 4, "target_modules": ["q", "v", "o"]})
    config, state = peft_export(applied, "lora")
    assert config["fan_in_fan_out"] is True and sorted(config["target_modules"]) == ["attn.c_proj", "c_attn"]
    assert (config["r"], config["rank_pattern"], config["alpha_pattern"]) == (2, {"c_attn": 4}, {"c_attn": 8.0})
    b = state["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert b.shape == (96, 4) and not b[32:64].any() and not b[:32, 2:].any() and not b[64:, :2].any()


PEFT_CASES = [
    ("llama", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                              use_dora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})),
    ("gpt2", peft.LoraConfig(r=3, lora_alpha=6, lora_dropout=0.1, target_modules=["c_attn", "c_fc"],
                             fan_in_fan_out=True)),
    ("gpt2", peft.IA3Config(target_modules=["c_attn", "c_proj"], feedforward_modules=["c_proj"])),
    # PEFT matches feedforward names as plain suffixes: "own_proj" selects down_proj (peftlab's rule would not)
    ("llama", peft.IA3Config(target_modules=r".*\.(k_proj|v_proj|down_proj)", feedforward_modules=["own_proj"])),
    ("llama", peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    ("llama", peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True)),
    ("gpt2", peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
]


def peft_adapter(family: str, config, folder: Path) -> nn.Module:
    """A PEFT model with random adapter weights, saved with save_pretrained to ``folder``."""
    model = peft.get_peft_model(MODEL_FACTORIES[family](), config)
    randomize([(n, p) for n, p in model.named_parameters() if p.requires_grad], seed=7)
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize(("family", "config"), PEFT_CASES, ids=lambda c: str(getattr(c, "peft_type", c)))
def test_import_peft_adapter_matches_peft(tmp_path, family, config):
    reference = peft_adapter(family, config, tmp_path / "peft")
    ids, mask = inputs()
    model = MODEL_FACTORIES[family]()
    method, record = load_adapter(model, tmp_path / "peft")
    compare(logits(reference, None, ids, mask), logits(model, method, ids, mask),
            base=logits(MODEL_FACTORIES[family](), None, ids, mask))
    names = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt-tuning", "PREFIX_TUNING": "prefix-tuning"}
    assert record["method"] == names[config.peft_type] and record["base_fingerprint"] is None


def test_cli_export_import_and_eval_of_a_peft_folder(tiny_llama_dir, tmp_path, cli):
    model, _ = load_model_and_tokenizer(ModelConfig(name=str(tiny_llama_dir)))
    fingerprint = arch_fingerprint(model)
    spec = get_method("lora")
    method = spec.apply(model, spec.build_config({"r": 2, "target_modules": ["q", "v", "o"], "use_dora": True}))
    randomize(method.trainable_parameters())
    ours_dir = save_adapter(method, "lora", tmp_path / "ours", str(tiny_llama_dir), fingerprint)

    assert cli(["export", "--adapter", str(ours_dir), "--to", "peft", str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == Path(tiny_llama_dir).resolve()
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    reference = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ids, mask = inputs(vocab=500)
    expected = logits(model.eval(), method, ids, mask)
    compare(expected, logits(reference, None, ids, mask))

    assert cli(["import", str(tmp_path / "peft"), str(tmp_path / "imported")]) == 0
    record = read_adapter_config(tmp_path / "imported")
    assert record["format"] == "peftlab-adapter" and record["base_fingerprint"] == fingerprint
    fresh, _ = load_model_and_tokenizer(ModelConfig(name=str(tiny_llama_dir)))
    compare(expected, logits(fresh, load_adapter(fresh, tmp_path / "imported")[0], ids, mask))

    from peftlab.lab.experiment import eval_run

    common = [f"model={tiny_llama_dir}", "data=demo", "data.max_test=2", "eval.max_new_tokens=4"]
    from_peft = eval_run(load_config(None, [*common, f"adapter={tmp_path / 'peft'}", f"out={tmp_path / 'e1'}"]))
    from_ours = eval_run(load_config(None, [*common, f"adapter={ours_dir}", f"out={tmp_path / 'e2'}"]))
    assert from_peft.train_info.method_name == "lora"
    assert [s.prediction for s in from_peft.samples_of("test")] == [s.prediction for s in from_ours.samples_of("test")]


@pytest.mark.parametrize(("method", "options"), [
    ("lora", {"r": 2, "target_modules": ["q", "v"], "use_dora": True}),
    ("ia3", {"target_modules": ["k", "v", "up", "down"], "feedforward_modules": ["down"]}),
])
def test_merge_writes_a_plain_model_with_the_adapters_logits(tiny_gpt2_dir, tmp_path, cli, method, options):
    model, _ = load_model_and_tokenizer(ModelConfig(name=str(tiny_gpt2_dir)))
    fingerprint = arch_fingerprint(model)
    spec = get_method(method)
    applied = spec.apply(model, spec.build_config(options))
    randomize(applied.trainable_parameters())
    adapter = save_adapter(applied, method, tmp_path / "adapter", str(tiny_gpt2_dir), fingerprint)
    assert cli(["merge", "--adapter", str(adapter), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (tmp_path / "merged" / "tokenizer_config.json").exists()
    assert not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters())
    ids, mask = inputs(vocab=500)
    compare(logits(model, applied, ids, mask), logits(merged, None, ids, mask))


def test_merge_refuses_a_method_without_a_merged_form_and_a_full_output(tiny_llama_dir, tmp_path, cli):
    model, _ = load_model_and_tokenizer(ModelConfig(name=str(tiny_llama_dir)))
    fingerprint = arch_fingerprint(model)
    spec = get_method("prompt-tuning")
    adapter = save_adapter(spec.apply(model, spec.build_config({"n_tokens": 2})), "prompt-tuning",
                           tmp_path / "adapter", str(tiny_llama_dir), fingerprint)
    with pytest.raises(NotMergeableError, match="'prompt-tuning' cannot be merged.*lora \\(W \\+= s B A"):
        merge_adapter(adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and [p.name for p in tmp_path.iterdir()] == ["adapter"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="not empty"):
        merge_adapter(adapter, tmp_path / "full")
    assert cli(["export", "--adapter", str(adapter), str(tmp_path / "full")]) == 2  # reported, not a traceback
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"


def test_export_refuses_methods_without_a_peft_equivalent(tiny_llama_dir, tmp_path, cli, capsys):
    _, method = ours("gpt2", "bitfit", {})
    listed = re.escape(", ".join(exportable_methods()))  # every registered method with a converter, by name
    assert {"ia3", "lora", "prefix-tuning"} <= set(exportable_methods()) and "bitfit" not in exportable_methods()
    with pytest.raises(PeftFormatError, match=f"'bitfit'.*exportable methods: {listed}"):
        peft_export(method, "bitfit")
    model, _ = load_model_and_tokenizer(ModelConfig(name=str(tiny_llama_dir)))
    fingerprint = arch_fingerprint(model)
    spec = get_method("last-layer")
    adapter = save_adapter(spec.apply(model, spec.build_config({})), "last-layer", tmp_path / "a",
                           str(tiny_llama_dir), fingerprint)
    assert cli(["export", "--adapter", str(adapter), str(tmp_path / "out")]) == 2
    assert "'last-layer' has no Hugging Face PEFT equivalent" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def write_peft(folder: Path, config: dict, state: dict[str, torch.Tensor] | None = None) -> Path:
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if state is not None:
        save_file(state, folder / "adapter_model.safetensors")
    return folder


LORA = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}
STATE = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32)}


@pytest.mark.parametrize(("config", "match"), [
    ({**LORA, "layers_to_transform": [0]}, "layers_to_transform=\\[0\\] is not supported by peftlab's lora"),
    ({**LORA, "bias": "all"}, "bias='all' is not supported"),
    ({**LORA, "init_lora_weights": "corda"}, "init_lora_weights='corda' is not supported"),  # pissa/olora import
    ({**LORA, "task_type": "SEQ_CLS"}, "task_type='SEQ_CLS'"),
    ({**LORA, "peft_type": "BOFT"}, "peft_type='BOFT' cannot be imported; importable PEFT types: IA3, "),
    ({**LORA, "rank_pattern": {"q_proj": 0}}, "rank_pattern must map module patterns to numbers > 0"),
    ({**LORA, "r": None}, "'r' is missing"),
])
def test_unsupported_peft_options_are_named(tmp_path, config, match):
    folder = write_peft(tmp_path / "p", config, STATE)
    with pytest.raises(PeftFormatError, match=match):
        load_adapter(MODEL_FACTORIES["llama"](), folder)


def test_peft_folder_problems_are_named(tmp_path):
    pickled = write_peft(tmp_path / "bin", LORA)
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(PeftFormatError, match="adapter_model.bin.*safetensors only"):
        load_adapter(MODEL_FACTORIES["llama"](), pickled)
    with pytest.raises(AdapterMismatchError, match="'q_proj' matches no linear layer of this gpt2"):
        load_adapter(MODEL_FACTORIES["gpt2"](), write_peft(tmp_path / "lora", LORA, STATE))
    with pytest.raises(AdapterMismatchError, match=r"3 weight\(s\) the model needs are not in adapter_model"):
        load_adapter(MODEL_FACTORIES["llama"](), tmp_path / "lora")
    made_on_llama = tmp_path / "prefix"
    peft_adapter("llama", peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), made_on_llama)
    with pytest.raises(AdapterMismatchError, match=r"prompt_embeddings: file \(3, 64\) vs model \(3, 128\)"):
        load_adapter(MODEL_FACTORIES["gpt2"](), made_on_llama)
    prompt = write_peft(tmp_path / "prompt", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "token_dim": 64,
                                              "num_layers": 2}, {"prompt_embeddings": torch.zeros(2, 64)})
    with pytest.raises(AdapterMismatchError, match="token_dim: adapter 64 vs model 32"):
        load_adapter(MODEL_FACTORIES["llama"](), prompt)


def test_add_parsers_registers_the_three_commands():
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["export", "--adapter", "a", "out"])
    assert (ns.to, ns.adapter, ns.out, ns.model) == ("peft", "a", "out", None)
    assert parser.parse_args(["import", "p", "o", "--model", "gpt2"]).model == "gpt2"
    assert parser.parse_args(["merge", "--adapter", "a", "o", "--dtype", "bfloat16"]).dtype == "bfloat16"
