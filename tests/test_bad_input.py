"""Bad input of every class ends in one clear error naming the file / line / key and what is expected (issue 10).

One case per input class, table-driven: a case builds its input under ``tmp_path`` and returns either the command
line of ``peftlab`` (then the exit code must be 2 and stderr exactly one line) or a callable that must raise a
``ValueError`` / ``FileNotFoundError``. Either way the message must match the case's pattern, which names the file,
line or key. Tiny in-memory models only (no downloads, no real model). RELIABILITY.md ("Bad input") counts the
classes from :data:`CASES`.
"""

from __future__ import annotations

import gzip
import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from safetensors.torch import save_file

from peftlab.cli import main
from peftlab.config import DataConfig, TaskConfig
from peftlab.data import readers
from peftlab.data.dataset import load_examples
from peftlab.interop.adapter_files import load_adapter, read_adapter_config
from peftlab.methods import get_method
from peftlab.methods.io import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from peftlab.models.arch import arch_fingerprint
from peftlab.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_thread")

Action = list[str] | Callable[[], object]
LINE_LIMIT = 1024  # readers.MAX_LINE_BYTES during these tests: the rule, not the size (no 32 MiB file here)


# ---------------------------------------------------------------------------------------------------------------------
# Inputs


def _cli_config(*overrides: str) -> Callable[[Path], Action]:
    return lambda tmp: ["train", *overrides, f"out={tmp}/out"]


def _yaml(text: str) -> Callable[[Path], Action]:
    def build(tmp: Path) -> Action:
        (tmp / "run.yaml").write_text(text)
        return ["train", str(tmp / "run.yaml"), f"out={tmp}/out"]
    return build


def _data(name: str, content: bytes, task: str = "summarization") -> Callable[[Path], Action]:
    """Read split ``train`` of a folder holding ``name`` with ``content``, as the run would."""
    def build(tmp: Path) -> Action:
        (tmp / "data").mkdir()
        (tmp / "data" / name).write_bytes(content)
        cfg = DataConfig(path=str(tmp / "data"))
        return lambda: load_examples(cfg, get_task(TaskConfig(name=task)), "train")
    return build


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _lora_adapter(tmp: Path, factory: Callable[[], torch.nn.Module] = tiny_llama, r: int = 4) -> Path:
    """A LoRA adapter folder saved by peftlab for a tiny model (fingerprint taken before the method is applied)."""
    model = factory()
    fingerprint = arch_fingerprint(model)
    spec = get_method("lora")
    method = spec.apply(model, spec.build_config({"r": r}))
    return save_adapter(method, "lora", tmp / "adapter", "tiny", fingerprint)


def _load_on_llama(folder: Path) -> Action:
    return lambda: load_adapter(tiny_llama(), folder)


def _eval_cli(tmp: Path, folder: Path | str) -> Action:
    return ["eval", f"adapter={folder}", f"out={tmp}/out"]


def _raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _adapter_with(edit: Callable[[Path], None], cli: bool = False) -> Callable[[Path], Action]:
    """A valid tiny-Llama LoRA adapter, changed by ``edit``, then loaded (``peftlab eval`` or ``load_adapter``)."""
    def build(tmp: Path) -> Action:
        folder = _lora_adapter(tmp)
        edit(folder)
        return _eval_cli(tmp, folder) if cli else _load_on_llama(folder)
    return build


def _edit_config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / CONFIG_NAME).read_text())
        change(config)
        (folder / CONFIG_NAME).write_text(json.dumps(config))
    return edit


def _truncate(folder: Path) -> None:
    path = folder / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:100])


def _int_weights(folder: Path) -> None:
    state = load_adapter(tiny_llama(), folder)[0].adapter_state_dict()
    save_file({k: torch.zeros(v.shape, dtype=torch.int64) for k, v in state.items()}, folder / WEIGHTS_NAME)


def _absurd_shape(folder: Path) -> None:
    """One tensor claiming 10^12 x 10^12 floats in a 16-byte range."""
    _raw_safetensors(folder / WEIGHTS_NAME, {"x.lora_A": {"dtype": "F32", "shape": [10**12, 10**12],
                                                          "data_offsets": [0, 16]}}, bytes(16))


def _over_budget(folder: Path) -> None:
    """Consistent, but 4 MiB of tensors for an adapter of a few thousand parameters."""
    save_file({"huge": torch.zeros(1024, 1024)}, folder / WEIGHTS_NAME)


def _other_rank_weights(tmp: Path) -> Action:
    """The weights of an r=2 adapter under a config that says r=4: shapes differ, names do not."""
    folder = _lora_adapter(tmp)
    small = _lora_adapter(tmp / "small", r=2)
    (folder / WEIGHTS_NAME).write_bytes((small / WEIGHTS_NAME).read_bytes())
    return _load_on_llama(folder)


def _other_base(tmp: Path) -> Action:
    return _load_on_llama(_lora_adapter(tmp, factory=tiny_gpt2))


def _peft_folder(config: dict, weights: bool = True, pickle_only: bool = False) -> Callable[[Path], Action]:
    def build(tmp: Path) -> Action:
        folder = tmp / "peft"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(config))
        if weights:
            save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 2)}, folder / "adapter_model.safetensors")
        if pickle_only:
            (folder / "adapter_model.bin").write_bytes(b"\x80\x04not to be unpickled")
        return lambda: read_adapter_config(folder)
    return build


PEFT_LORA = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}


def _cli(*argv: str) -> Callable[[Path], Action]:
    return lambda tmp: [a.replace("{tmp}", str(tmp)) for a in argv]


def _report_a_file(tmp: Path) -> Action:
    (tmp / "r.json").write_text("{}")
    return ["report", str(tmp / "r.json")]


# ---------------------------------------------------------------------------------------------------------------------
# The table: (input class, build(tmp) -> action, pattern; {tmp} is tmp_path, escaped)


@dataclass
class Case:
    id: str
    build: Callable[..., Action]
    pattern: str


CASES = [
    # config: every key with a wrong type, range or unknown value, from the command line or a YAML file
    Case("config-wrong-type", _cli_config("train.lr=abc"), r"train\.lr: expected a number .* got 'abc'"),
    Case("config-wrong-int", _cli_config("train.batch_size=2.5"), r"train\.batch_size: expected an integer, got 2\.5"),
    Case("config-wrong-bool", _cli_config("train.bf16=maybe"), r"train\.bf16: expected true or false, got 'maybe'"),
    Case("config-list-item-type", _cli_config("task.labels=[a, [b]]"), r"task\.labels\[1\]: expected a string"),
    Case("config-out-of-range", _cli_config("train.warmup_ratio=1.5"), r"train\.warmup_ratio: must be in \[0, 1\)"),
    Case("config-unknown-key", _cli_config("train.lrr=1"),
         r"unknown config key 'train\.lrr' \(did you mean 'train\.lr'\?\)"),
    Case("config-unknown-choice", _cli_config("train.schedule=exp"), r"train\.schedule: 'exp' is not one of 'linear'"),
    Case("config-unknown-method", _cli_config("method=nope"), r"unknown method 'nope'; choose one of .*lora"),
    Case("config-method-option-type", _cli_config("method.r=abc"), r"method\.r: expected an integer, got 'abc'"),
    Case("config-method-option-range", _cli_config("method.dropout=1.5"), r"method\.dropout: must be in \[0, 1\)"),
    Case("config-unknown-method-option", _cli_config("method.rank=4"), r"method\.rank .* valid: .*method\.r\b"),
    Case("config-unknown-task", _cli_config("task=poetry"), r"task\.name: 'poetry' is not one of 'classification'"),
    Case("config-missing-data-path", _cli_config("data=./nowhere/data"), r"data\.path '\./nowhere/data': no such"),
    Case("config-yaml-syntax", _yaml("train: [unclosed\n"),
         r"{tmp}/run\.yaml: not valid YAML: expected ',' or '\]', .* \(line 2, column 1\)"),
    Case("config-yaml-not-mapping", _yaml("- a\n- b\n"), r"{tmp}/run\.yaml: the top level must be a mapping"),
    Case("config-yaml-section-scalar", _yaml("train: 5\n"),
         r"{tmp}/run\.yaml: train: expected a mapping of train\.\*"),
    Case("config-yaml-wrong-type", _yaml("train:\n  epochs: lots\n"),
         r"{tmp}/run\.yaml: train\.epochs: expected a number"),
    Case("config-override-syntax", _cli_config("train.lr"), r"unexpected argument 'train\.lr'"),
    # data readers
    Case("data-invalid-json", _data("train.jsonl", b'{"article": "a", "summary": "s"}\n{"article": \n'),
         r"{tmp}/data/train\.jsonl:2: not valid JSON"),
    Case("data-not-an-object", _data("train.jsonl", b'["a", "b"]\n'),
         r"{tmp}/data/train\.jsonl:1: expected one JSON object .* got an array"),
    Case("data-missing-field", _data("train.jsonl", b'{"article": "a", "summary": "s"}\n{"text": "a"}\n'),
         r"{tmp}/data/train\.jsonl:2: missing source field 'article'; fields present: 'text'"),
    Case("data-wrong-field-type", _data("train.jsonl", b'{"article": "a", "summary": 5}\n'),
         r"{tmp}/data/train\.jsonl:1: field 'summary' must be a string or a list of strings, got int"),
    Case("data-label-wrong-type", _data("train.jsonl", b'{"text": "a", "label": [1]}\n', task="classification"),
         r"{tmp}/data/train\.jsonl:1: label field 'label' must be a string or an integer"),
    Case("data-empty-file", _data("train.jsonl", b""), r"{tmp}/data/train\.jsonl: the file is empty"),
    Case("data-non-utf8", _data("train.jsonl", b'{"article": "a", "summary": "s"}\n{"article": "caf\xe9"}\n'),
         r"{tmp}/data/train\.jsonl:2: not valid UTF-8 \(.* at byte 16 of the line"),
    Case("data-non-utf8-csv", _data("train.csv", b"article,summary\na,s\ncaf\xe9,s\n"),
         r"{tmp}/data/train\.csv:3: not valid UTF-8"),
    Case("data-line-too-long", _data("train.jsonl", b'{"article": "ok", "summary": "ok"}\n{"article": "'
                                     + b"x" * (LINE_LIMIT + 100) + b'"}\n'),
         rf"{{tmp}}/data/train\.jsonl:2: line longer than {LINE_LIMIT} bytes \(the limit\)"),
    Case("data-gz-not-gzip", _data("train.jsonl.gz", b'{"article": "a"}\n'),
         r"{tmp}/data/train\.jsonl\.gz: not gzip data .* name it \.jsonl"),
    Case("data-gzip-in-jsonl", _data("train.jsonl", _gzip(b'{"article": "a"}\n')),
         r"{tmp}/data/train\.jsonl: holds gzip data, not text; name it \.jsonl\.gz"),
    Case("data-truncated-gzip", _data("train.jsonl.gz", _gzip(b'{"article": "a", "summary": "s"}\n' * 500)[:-12]),
         r"{tmp}/data/train\.jsonl\.gz: cannot read as gzip-compressed JSONL"),
    Case("data-csv-ragged-row", _data("train.csv", b"article,summary\na,s\nb\n"),
         r"{tmp}/data/train\.csv:3: 1 fields, but the header \(line 1\) has 2"),
    Case("data-corrupt-parquet", _data("train.parquet", b"PAR1 truncated"),
         r"{tmp}/data/train\.parquet: not a readable Parquet file"),
    Case("data-missing-split", _data("validation.jsonl", b'{"article": "a"}\n'),
         r"{tmp}/data: no file for split 'train'; expected one of train\.jsonl"),
    # adapters and PEFT folders
    Case("adapter-missing-folder", lambda tmp: _eval_cli(tmp, tmp / "nope"), r"adapter folder {tmp}/nope: no such"),
    Case("adapter-missing-weights", _adapter_with(lambda f: (f / WEIGHTS_NAME).unlink(), cli=True),
         r"{tmp}/adapter/adapter\.safetensors: no such file"),
    Case("adapter-truncated", _adapter_with(_truncate, cli=True),
         r"{tmp}/adapter/adapter\.safetensors: header length \d+ bytes, but the file has 92 bytes .* truncated"),
    Case("adapter-header-not-json", _adapter_with(lambda f: (f / WEIGHTS_NAME).write_bytes(
        struct.pack("<Q", 4) + b"\xff\xfe{x"), cli=True), r"{tmp}/adapter/adapter\.safetensors: .* not valid JSON"),
    Case("adapter-absurd-shape", _adapter_with(_absurd_shape, cli=True),
         r"{tmp}/adapter/adapter\.safetensors: tensor 'x\.lora_A': dtype F32 x shape \[1000000000000, 1000000000000\] "
         r"needs \d+ bytes, but its byte range \[0, 16\] holds 16"),
    Case("adapter-over-budget", _adapter_with(_over_budget),
         r"{tmp}/adapter/adapter\.safetensors: declares 4194304 bytes of tensors, more than this model's adapter"),
    Case("adapter-wrong-dtype", _adapter_with(_int_weights),
         r"{tmp}/adapter/adapter\.safetensors: adapter weights must be floating point .* \(I64\)"),
    Case("adapter-wrong-shape", _other_rank_weights,
         r"{tmp}/adapter/adapter\.safetensors: adapter weight '.*lora_A.*' has shape \(2, 32\), the model expects "
         r"\(4, 32\)"),
    Case("adapter-config-not-json", _adapter_with(lambda f: (f / CONFIG_NAME).write_text('{"format": '), cli=True),
         r"{tmp}/adapter/adapter_config\.json: not valid JSON"),
    Case("adapter-config-unknown-method", _adapter_with(_edit_config(lambda c: c.update(method="dora")), cli=True),
         r"{tmp}/adapter/adapter_config\.json: method: unknown method 'dora'; choose one of"),
    Case("adapter-config-bad-option", _adapter_with(_edit_config(lambda c: c["method_config"].update(r=-1)),
                                                    cli=True),
         r"{tmp}/adapter/adapter_config\.json: method\.r: must be an integer > 0, got -1"),
    Case("adapter-config-missing-key", _adapter_with(_edit_config(lambda c: c.pop("base_fingerprint")), cli=True),
         r"{tmp}/adapter/adapter_config\.json: key 'base_fingerprint' must be a JSON object, got None"),
    Case("adapter-other-base-model", _other_base,
         r"adapter {tmp}/adapter was trained on 'tiny', which differs from this base model: .*model_type: adapter "
         r"'gpt2' vs model 'llama'"),
    Case("peft-unsupported-type", _peft_folder({"peft_type": "BOFT", "r": 4}),
         r"{tmp}/peft/adapter_config\.json: peft_type='BOFT' cannot be imported; "
         r"importable PEFT types: IA3, LOHA, LOKR, LORA"),
    Case("peft-unsupported-option", _peft_folder({**PEFT_LORA, "layers_to_transform": [0]}),
         r"{tmp}/peft/adapter_config\.json: PEFT option layers_to_transform=\[0\] is not supported"),
    Case("peft-pickle-only", _peft_folder(PEFT_LORA, weights=False, pickle_only=True),
         r"{tmp}/peft: holds adapter_model\.bin \(a pickle\) but no adapter_model\.safetensors"),
    # CLI arguments of every subcommand
    Case("cli-unknown-subcommand", _cli("frobnicate"), r"peftlab: error: argument command: invalid choice"),
    Case("cli-bad-choice", _cli("export", "--adapter", "{tmp}", "--to", "onnx", "{tmp}/out"),
         r"peftlab export: error: argument --to: invalid choice: 'onnx' \(choose from 'peft'\)"),
    Case("cli-missing-argument", _cli("export", "--to", "peft", "{tmp}/out"),
         r"peftlab export: error: the following arguments are required: --adapter"),
    Case("cli-unknown-option", _cli("merge", "--adapter", "{tmp}", "{tmp}/out", "--fast"),
         r"peftlab: error: unrecognized arguments: --fast"),
    Case("cli-export-missing-folder", _cli("export", "--adapter", "{tmp}/nope", "{tmp}/out"),
         r"adapter folder {tmp}/nope: no such folder"),
    Case("cli-import-missing-folder", _cli("import", "{tmp}/nope", "{tmp}/out"),
         r"{tmp}/nope: no adapter_config\.json here; expected a PEFT adapter folder"),
    Case("cli-merge-missing-folder", _cli("merge", "--adapter", "{tmp}/nope", "{tmp}/out"),
         r"adapter folder {tmp}/nope: no such folder"),
    Case("cli-report-missing-folder", _cli("report", "{tmp}/nope"), r"{tmp}/nope: results folder not found"),
    Case("cli-report-given-a-file", _report_a_file, r"{tmp}/r\.json: is a file; give the results folder"),
    Case("cli-analyze-missing-folder", _cli("analyze", "subspace", "{tmp}/a", "{tmp}/b"),
         r"{tmp}/a: no adapter_config\.json here"),
    Case("cli-compare-missing-grid", _cli("compare", "{tmp}/grid.yaml"), r"cannot read grid file {tmp}/grid\.yaml"),
    Case("cli-budget-syntax", _cli("methods", "--budget", "lots"), r"budget: 'lots' is not a percentage"),
]


def _run_cli(argv: list[str]) -> int | str | None:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse exits by itself on usage errors
        return exc.code


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_ends_in_one_clear_error(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths in the cases resolve under tmp_path
    monkeypatch.setattr(readers, "MAX_LINE_BYTES", LINE_LIMIT)
    action = case.build(tmp_path)
    pattern = case.pattern.format(tmp=re.escape(str(tmp_path)))
    if callable(action):
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            action()
        message = str(info.value)
    else:
        assert _run_cli(action) == 2
        message = capsys.readouterr().err
        assert message.count("\n") == 1 and message.startswith("peftlab"), message  # one line: no traceback, usage
    assert re.search(pattern, message), f"{message!r} does not match {pattern!r}"


def test_every_class_is_counted_in_reliability_md() -> None:
    """RELIABILITY.md states the number of bad-input classes this table holds."""
    text = (Path(__file__).resolve().parents[1] / "RELIABILITY.md").read_text()
    assert f"{len(CASES)} input classes" in text
