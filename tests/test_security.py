"""What a user is handed is data, never code (issue 10, "Security"; the trust model is in RELIABILITY.md).

* Nothing is unpickled while reading adapters and PEFT folders, even when a pickle sits next to the safetensors.
* ``trust_remote_code`` reaches transformers as False unless ``model.trust_remote_code=true`` asks.
* Hostile strings in data, generations and configs stay text in the HTML and Markdown report.
* Absurd shapes and sizes in a weight file are refused from its header, before safetensors reads a tensor.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import save_file

from peftlab.analysis.adapters import read_saved_adapter
from peftlab.config import ModelConfig, load_config
from peftlab.interop.adapter_files import load_adapter, read_adapter_config
from peftlab.methods import get_method, tensor_file
from peftlab.methods.io import WEIGHTS_NAME, save_adapter
from peftlab.methods.tensor_file import TensorFileError, load_adapter_tensors, read_header
from peftlab.models import loading
from peftlab.models.arch import arch_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = Path(__file__).resolve().parents[1] / "src" / "peftlab"


class _Payload:
    """Unpickling this touches the marker file: the proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _plant_pickles(folder: Path, marker: Path) -> None:
    """Every pickle name a PEFT or torch user might leave in an adapter or run folder."""
    for name in ("adapter_model.bin", "pytorch_model.bin", "trainer.pt", "optimizer.pt", "training_args.bin"):
        (folder / name).write_bytes(pickle.dumps(_Payload(marker)))


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every unpickling entry point raises while the test runs."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("something was unpickled")

    for owner, name in ((pickle, "load"), (pickle, "loads"), (torch, "load"), (np, "load")):
        monkeypatch.setattr(owner, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


def _peftlab_adapter(tmp_path: Path) -> Path:
    model = tiny_llama()
    fingerprint = arch_fingerprint(model)
    spec = get_method("lora")
    return save_adapter(spec.apply(model, spec.build_config({"r": 2})), "lora", tmp_path / "adapter", "tiny",
                        fingerprint)


def _peft_adapter(tmp_path: Path) -> Path:
    """A PEFT LoRA folder (q_proj, r=2) for the tiny Llama, written by hand as PEFT lays it out."""
    folder = tmp_path / "peft"
    folder.mkdir()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
              "base_model_name_or_path": "tiny"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers"
    weights = {f"{prefix}.{i}.self_attn.q_proj.lora_{ab}.weight": torch.randn(shape)
               for i in range(2) for ab, shape in (("A", (2, 32)), ("B", (32, 2)))}
    save_file(weights, folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize("kind", ["peftlab", "peft"])
def test_adapters_load_without_unpickling_anything(kind: str, tmp_path: Path, no_unpickling: None) -> None:
    folder = _peftlab_adapter(tmp_path) if kind == "peftlab" else _peft_adapter(tmp_path)
    marker = tmp_path / "unpickled"
    _plant_pickles(folder, marker)
    read_adapter_config(folder)
    method, _ = load_adapter(tiny_llama(), folder)
    read_saved_adapter(folder)  # the analysis tools' reader
    assert method.trainable_parameters() and not marker.exists()


def test_a_pickle_only_peft_folder_is_refused_unread(tmp_path: Path, no_unpickling: None) -> None:
    folder = _peft_adapter(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    _plant_pickles(folder, marker)
    for read in (read_adapter_config, lambda f: load_adapter(tiny_llama(), f), read_saved_adapter):
        with pytest.raises(ValueError, match=r"adapter_model\.bin \(a pickle\)"):
            read(folder)
    assert not marker.exists()


def test_no_unpickling_call_in_the_package() -> None:
    """The source holds no call that unpickles (torch.load, pickle.load(s), numpy's allow_pickle)."""
    calls = re.compile(r"\btorch\.load\(|\bpickle\.loads?\(|allow_pickle\s*=\s*True|\bUnpickler\("
                       r"|weights_only\s*=\s*False")
    found = [f"{path.relative_to(SRC)}:{n}" for path in SRC.rglob("*.py")
             for n, line in enumerate(path.read_text().splitlines(), 1) if calls.search(line)]
    assert found == []


def test_trust_remote_code_is_off_unless_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every from_pretrained of the loader gets trust_remote_code=False by default and True only when asked."""
    seen: list[tuple[str, object]] = []

    class Stop(Exception):
        pass

    def record(name: str):
        def from_pretrained(*args: object, **kwargs: object) -> None:
            seen.append((name, kwargs.get("trust_remote_code", "not passed")))
            raise Stop
        return from_pretrained

    for auto in ("AutoModelForCausalLM", "AutoTokenizer", "AutoConfig"):
        monkeypatch.setattr(getattr(loading, auto), "from_pretrained", record(auto))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert load_config().model.trust_remote_code is False
    for asked in (False, True):
        seen.clear()
        cfg = ModelConfig(name=str(folder), trust_remote_code=asked)
        for load in (loading.load_model_and_tokenizer, loading.load_model_config):
            with pytest.raises(Stop):
                load(cfg)
        assert seen == [("AutoModelForCausalLM", asked), ("AutoConfig", asked)]


def test_no_hardcoded_remote_code_in_the_package() -> None:
    found = [str(path.relative_to(SRC)) for path in SRC.rglob("*.py") if "trust_remote_code=True" in path.read_text()]
    assert found == []


HOSTILE = ['</script><script>alert(1)</script>', '<img src=x onerror="alert(2)">', "\"quoted' attr=\"x",
           "[click](javascript:alert(3)) ![t](https://tracker.example/p.png)"]


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _hostile_results(root: Path) -> None:
    """A results folder whose data, generations and config strings are all hostile."""
    from test_report import make_result  # the schema-valid synthetic result of the report's own tests

    hostile = " ".join(HOSTILE)
    for seed in (0, 1):
        result = make_result("lora", "default", 100, seed)
        result["samples"]["test"] = [{"id": hostile, "source": hostile, "prediction": hostile,
                                      "references": [hostile]}]
        result["run_info"]["command"] = hostile
        result["run_info"]["config"]["method"]["options"] = {"target_modules": hostile}
        folder = root / "summarization"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"lora--default--n100--seed{seed}.json").write_text(json.dumps(result))


def test_hostile_strings_stay_text_in_the_report(tmp_path: Path) -> None:
    from peftlab.lab.report import write_report

    _hostile_results(tmp_path / "results")
    md, page = write_report(tmp_path / "results")
    text = page.read_text()
    parser = _Tags()
    parser.feed(text)
    for tag, attrs in parser.tags:
        assert tag != "script" and not any(name.startswith("on") for name in attrs), (tag, attrs)
        if tag == "img":
            assert (attrs.get("src") or "").startswith("data:image/png;base64,")
    for raw in HOSTILE[:2]:
        assert raw not in text
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in text  # shown, as text
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in text
    markdown = md.read_text()
    outside_code = re.sub(r"(?ms)^(`{3,})\n.*?\n\1$", "", markdown)  # fenced blocks show the source verbatim
    assert "<img" not in outside_code and "<script" not in outside_code
    assert re.search(r"(?<!\\)\[(click|t)(?<!\\)\]", outside_code) is None  # brackets escaped: no link, no image
    assert "\\[click\\](javascript:alert(3))" in outside_code


def _raw_file(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(("header", "data", "pattern"), [
    ({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, bytes(8),
     r"tensor 'a': dtype F32 x shape .* needs \d+ bytes, but its byte range \[0, 8\] holds 8"),
    ({"a": {"dtype": "F32", "shape": [2**20], "data_offsets": [0, 4 * 2**20]}}, bytes(8),
     r"tensor 'a' ends at byte 4194304 of the data, but the file holds 8 data bytes: truncated"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), r"overlapping or gapped"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", r"shape must be a list of integers >= 0"),
    ({"a": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 1]}}, bytes(1), r"unknown dtype 'PICKLE'"),
], ids=["shape-vs-range", "range-past-end", "overlap", "negative-dim", "unknown-dtype"])
def test_absurd_headers_are_refused_before_reading(header: dict, data: bytes, pattern: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def no_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("safetensors was asked to read the file")

    monkeypatch.setattr(tensor_file, "safe_open", no_read)
    path = _raw_file(tmp_path / "w.safetensors", header, data)
    with pytest.raises(TensorFileError, match=pattern):
        load_adapter_tensors(path)


def test_header_length_beyond_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(TensorFileError, match=r"header length 4611686018427387904 bytes, but the file has 2 bytes"):
        read_header(path)


def test_an_adapter_larger_than_the_model_could_need_is_refused_before_reading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _peftlab_adapter(tmp_path)
    save_file({"padding": torch.zeros(256, 1024)}, folder / WEIGHTS_NAME)  # 1 MiB for a ~1 KiB adapter
    monkeypatch.setattr(tensor_file, "safe_open", lambda *a, **k: pytest.fail("read before the budget check"))
    with pytest.raises(TensorFileError, match=r"declares 1048576 bytes of tensors, more than this model's adapter "
                                              r"can hold \(\d+ bytes\); refused before reading"):
        load_adapter(tiny_llama(), folder)
