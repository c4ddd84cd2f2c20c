"""Read one split's raw rows: local JSONL / gzipped JSONL / CSV / Parquet files, the built-in demo, or the hub.

Every reader yields ``(row, where)`` pairs: ``row`` is a dict, ``where`` says where it came from for error messages
(``"path:line"`` for JSONL and CSV, with 1-based line numbers as an editor shows them; ``"path:row N"`` for Parquet
and ``"hub NAME[SPLIT] row N"`` for hub datasets, 1-based as well).

``data.path`` is resolved as follows (:func:`open_split`):

* ``"demo"``: the built-in demo rows (:func:`peftlab.data.demo.demo_rows`).
* an existing folder: the file ``<split>.jsonl``, ``<split>.jsonl.gz``, ``<split>.csv`` or ``<split>.parquet`` in it.
* an existing file: that file, whatever split is asked for. The dataset layer only allows this for evaluation
  splits (never the training split), so a single file cannot silently serve as train and validation at once.
* anything else that looks like a hub name (``name`` or ``owner/name``): ``datasets.load_dataset``. Known datasets
  are mapped to the same fields as the local copies in ``../shared/data`` (see :data:`HUB_DATASETS`); unknown ones
  pass through unchanged, and ``task.source_field`` / ``task.target_field`` pick their fields.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from peftlab.tasks.base import DataError

Row = dict[str, Any]
RowIter = Iterator[tuple[Row, str]]

# Accepted file names for a split, in the order they are listed in messages.
SPLIT_SUFFIXES = (".jsonl", ".jsonl.gz", ".csv", ".parquet")

# Hub names (lower case) -> the mapping applied to their rows.
HUB_DATASETS = {
    "cnn_dailymail": "cnn_dailymail",
    "abisee/cnn_dailymail": "cnn_dailymail",
    "imdb": "imdb",
    "stanfordnlp/imdb": "imdb",
    "e2e_nlg": "e2e_nlg",
    "gem/e2e_nlg": "e2e_nlg",
    "tuetschek/e2e_nlg": "e2e_nlg",
}
HUB_DEFAULT_CONFIG = {"cnn_dailymail": "3.0.0"}

IMDB_LABELS = {0: "negative", 1: "positive", -1: ""}  # -1: the unlabelled "unsupervised" split -> empty target
IMDB_VALIDATION_PER_CLASS = 1250
IMDB_VALIDATION_SEED = 42


def open_split(path: str, split: str, hub_config: str | None = None) -> tuple[RowIter, str]:
    """Resolve ``data.path`` and open one split.

    Args:
        path: ``"demo"``, a local folder of split files, a single local file, or a hub dataset name.
        split: the split name (e.g. ``"validation"``).
        hub_config: the hub dataset configuration (``datasets.load_dataset``'s second argument).

    Returns:
        The rows as ``(row, where)`` pairs (read lazily), and a one-line description of the source.

    Raises:
        DataError: the split file is missing (the message lists the folder's files and the accepted names), the
            file type is not supported, or the hub dataset cannot be loaded.
    """
    if path == "demo":
        return _demo_rows(split), f"built-in demo data, split {split!r}"
    check_data_path(path)
    local = Path(path).expanduser()
    if local.is_dir():
        file = find_split_file(local, split)
        return read_file(file), str(file)
    if local.exists():
        return read_file(local), f"{local} (single file, used as split {split!r})"
    return read_hub(path, split, hub_config)


def check_data_path(path: str, key: str = "data.path") -> None:
    """Refuse a dataset path (``key``: ``data.path`` or ``eval.forgetting_data``) that is neither ``demo``, an
    existing local path nor a hub name (run before the model loads, from config validation).

    Raises:
        DataError: naming the key and the path.
    """
    if path != "demo" and not Path(path).expanduser().exists() and not looks_like_hub_name(path):
        raise DataError(f"{key} {path!r}: no such file or folder (and it is not a hub dataset name)")


def looks_like_hub_name(path: str) -> bool:
    """``name`` or ``owner/name``; paths such as ``./x``, ``/x``, ``a/b/c`` or ``x.jsonl`` are taken as local."""
    if path.startswith((".", "/", "~", "\\")) or path.count("/") > 1 or "\\" in path:
        return False
    return not any(path.endswith(suffix) for suffix in (*SPLIT_SUFFIXES, ".json", ".gz"))


def find_split_file(folder: Path, split: str) -> Path:
    """The one file in ``folder`` that holds ``split``.

    Raises:
        DataError: none or several files match; the message lists what the folder holds.
    """
    accepted = [f"{split}{suffix}" for suffix in SPLIT_SUFFIXES]
    found = [folder / name for name in accepted if (folder / name).exists()]
    if len(found) > 1:
        raise DataError(f"{folder}: split {split!r} has several files ({', '.join(p.name for p in found)}); "
                        "keep only one")
    if found:
        return found[0]
    names = sorted(p.name for p in folder.iterdir())
    splits = sorted({_split_of(name) for name in names} - {None})
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    raise DataError(f"{folder}: no file for split {split!r}; expected one of {', '.join(accepted)}. "
                    f"The folder holds: {shown or '(nothing)'}"
                    + (f" (splits found: {', '.join(splits)}; set data.train_split / data.validation_split / "
                       "data.test_split to use them)" if splits else ""))


def _split_of(name: str) -> str | None:
    for suffix in SPLIT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def read_file(path: Path) -> RowIter:
    """Rows of one local file; the format follows the name (``.jsonl``, ``.jsonl.gz``, ``.csv``, ``.parquet``).

    The file type and (for Parquet) the pyarrow import are checked now; the content is read lazily and a bad line
    raises :class:`DataError` naming ``path:line`` when it is reached.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a data file")
    name = path.name
    if name.endswith(".jsonl.gz"):
        return _read_jsonl(path, compressed=True)
    if name.endswith(".jsonl"):
        return _read_jsonl(path, compressed=False)
    if name.endswith(".csv"):
        return _read_csv(path)
    if name.endswith(".parquet"):
        return _read_parquet(path, _import_pyarrow_parquet(path))
    raise DataError(f"{path}: unsupported file type; accepted: {', '.join(SPLIT_SUFFIXES)}")


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# A longer line is refused after reading this much of it (never the whole line): records of real datasets are far
# smaller (CNN/DailyMail's longest article is under 100 KB), so such a line is a wrong file or a missing newline.
MAX_LINE_BYTES = 32 * 2**20
# The first bytes of compressed or binary formats, to name what a mislabelled file really is.
MAGIC = {b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"BZh": "bzip2", b"\x28\xb5\x2f\xfd": "zstd",
         b"\xfd7zXZ": "xz", b"PAR1": "Parquet"}


def _sniff(path: Path, expect_gzip: bool) -> None:
    """Refuse an empty file, a ``.gz`` that is not gzip, and compressed/binary data in a text file, by name."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if not head:
        raise DataError(f"{path}: the file is empty (0 bytes)")
    kind = next((name for magic, name in MAGIC.items() if head.startswith(magic)), None)
    if expect_gzip and kind != "gzip":
        hint = f"it holds {kind} data" if kind else "if it is plain JSONL, name it .jsonl"
        raise DataError(f"{path}: not gzip data (it starts with {head[:4]!r}); {hint}")
    if not expect_gzip and kind is not None:
        hint = "; name it .jsonl.gz" if kind == "gzip" else f"; convert it to {', '.join(SPLIT_SUFFIXES)}"
        raise DataError(f"{path}: holds {kind} data, not text{hint}")


def _bounded_lines(fh: Any, path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw bytes)`` of a binary file; a line over :data:`MAX_LINE_BYTES` raises ``DataError``."""
    line = 0
    while raw := fh.readline(MAX_LINE_BYTES + 1):
        line += 1
        if len(raw) > MAX_LINE_BYTES:
            raise DataError(f"{path}:{line}: line longer than {MAX_LINE_BYTES} bytes (the limit); expected one record "
                            "per line")
        yield line, raw


def _decode_line(raw: bytes, path: Path, line: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{line}: not valid UTF-8 ({exc.reason} at byte {exc.start} of the line, "
                        f"{raw[exc.start:exc.start + 4]!r}); save the file as UTF-8") from None
    return text.lstrip("\ufeff") if line == 1 else text  # a byte-order mark some editors write


def _parse_json_line(raw: bytes, path: Path, line: int) -> Row:
    text = _decode_line(raw, path, line)
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{line}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{line}: expected one JSON object ({{...}}) per line, got {_json_type(row)}")
    return row


def _read_jsonl(path: Path, compressed: bool) -> RowIter:
    kind = "gzip-compressed JSONL" if compressed else "JSONL"
    _sniff(path, compressed)
    line = 0
    try:
        # Binary lines, decoded one by one, so a decoding error names its exact line.
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as fh:
            for line, raw in _bounded_lines(fh, path):
                if raw.strip():
                    yield _parse_json_line(raw, path, line), f"{path}:{line}"
    except (OSError, EOFError, zlib.error) as exc:
        after = f" (after line {line})" if line else ""
        raise DataError(f"{path}: cannot read as {kind}{after}: {exc}") from exc


def _read_csv(path: Path) -> RowIter:
    # A field may span lines, so the field size is bounded as well as each line.
    csv.field_size_limit(MAX_LINE_BYTES)
    _sniff(path, expect_gzip=False)
    line = 0
    try:
        with open(path, "rb") as fh:
            reader = csv.reader(_decode_line(raw, path, n) for n, raw in _bounded_lines(fh, path))
            header = next(reader, None)
            if header is None:
                return
            _check_csv_header(header, path)
            line = reader.line_num
            for record in reader:
                start, line = line + 1, reader.line_num  # a quoted field may span lines: name the first one
                if not record:
                    continue
                if len(record) != len(header):
                    raise DataError(f"{path}:{start}: {len(record)} fields, but the header (line 1) has "
                                    f"{len(header)}: {', '.join(header)}")
                yield dict(zip(header, record, strict=True)), f"{path}:{start}"
    except csv.Error as exc:
        raise DataError(f"{path}:{line + 1}: malformed CSV: {exc}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _check_csv_header(header: list[str], path: Path) -> None:
    if any(not name.strip() for name in header):
        raise DataError(f"{path}:1: the header has an empty column name: {header}")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DataError(f"{path}:1: duplicate column names in the header: {', '.join(duplicates)}")


def _import_pyarrow_parquet(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet files needs pyarrow: pip install pyarrow "
                        "(or pip install 'peftlab[parquet]'), or convert the file to JSONL") from None
    return pq


def _read_parquet(path: Path, pq: Any) -> RowIter:
    import pyarrow as pa

    row = 0
    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield record, f"{path}:row {row}"
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file{f' (after row {row})' if row else ''}: {exc}") from exc


def _demo_rows(split: str) -> RowIter:
    from peftlab.data.demo import demo_rows  # imported here: only demo runs need it

    try:
        rows = demo_rows(split)
    except ValueError as exc:  # an unknown split; the message lists the demo's splits
        raise DataError(f"data.path=demo: {exc}") from None
    return ((row, f"demo[{split}] row {index}") for index, row in enumerate(rows, start=1))


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face hub


def read_hub(name: str, split: str, hub_config: str | None = None) -> tuple[RowIter, str]:
    """Rows of a hub dataset split, mapped to the local format when the dataset is known.

    Known datasets (:data:`HUB_DATASETS`):

    * CNN/DailyMail (config ``3.0.0`` by default): ``highlights`` is renamed ``summary``; ``id``, ``article`` kept.
    * IMDB: ``label`` 0/1 becomes ``"negative"``/``"positive"``; ids are ``imdb-<split>-<row>``. The hub has no
      validation split, so one is carved from train as ``../shared/data/imdb`` was: :func:`imdb_validation_rows`.
      Asking for ``train`` gives the rest of train. Note the hub's row order differs from the aclImdb file ids
      the local copy was sorted by, so the same procedure picks different reviews than the local copy.
    * E2E NLG: ``meaning_representation`` plus ``references``; train keeps one row per (MR, reference) pair,
      other splits group the references of each MR in order of first appearance, as the local copy does.

    Raises:
        DataError: ``datasets`` is missing, or ``load_dataset`` failed (e.g. offline); the message says what was tried.
    """
    kind = HUB_DATASETS.get(name.lower())
    config = hub_config if hub_config is not None else HUB_DEFAULT_CONFIG.get(kind or "")
    description = f"hub dataset {name!r}" + (f" config {config!r}" if config else "") + f", split {split!r}"
    where = f"hub {name}[{split}] row"
    if kind == "imdb":
        return _imdb_rows(name, config, split, where), description
    raw = _load_hub_split(name, config, split)
    if kind == "e2e_nlg":
        rows: RowIter = _e2e_rows(raw, split, where)
    elif kind == "cnn_dailymail":
        rows = ((_cnn_row(row), f"{where} {i}") for i, row in enumerate(raw, start=1))
    else:
        rows = ((dict(row), f"{where} {i}") for i, row in enumerate(raw, start=1))
    return rows, description


def _load_hub_split(name: str, config: str | None, split: str) -> Iterable[Row]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.path {name!r} is not a local file or folder, so it was taken as a Hugging Face hub "
                        "dataset; loading one needs the datasets package: pip install datasets "
                        "(or pip install 'peftlab[hub]')") from None
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many types (network, not found, bad split, ...): report them all
        raise DataError(f"could not load hub dataset {name!r} (config {config!r}, split {split!r}) with "
                        f"datasets.load_dataset: {type(exc).__name__}: {exc}. It is not a local path either. "
                        "If this machine is offline, get the data elsewhere and point data.path at a local folder "
                        f"of {', '.join('<split>' + s for s in SPLIT_SUFFIXES)} files") from exc


def _cnn_row(row: Row) -> Row:
    out = dict(row)
    if "highlights" in out:
        out["summary"] = out.pop("highlights")
    return out


def _require(row: Row, key: str, where: str) -> Any:
    if key not in row:
        raise DataError(f"{where}: missing field {key!r}; fields present: {', '.join(map(str, row)) or '(none)'}")
    return row[key]


def imdb_validation_rows(labels: list[int], per_class: int = IMDB_VALIDATION_PER_CLASS,
                         seed: int = IMDB_VALIDATION_SEED) -> set[int]:
    """Row indices of the validation carve-out from IMDB train, stratified by label.

    The procedure of ``../shared/data/imdb/SOURCE.md``: rows sorted by (label, index); one ``random.Random(seed)``
    draws ``per_class`` rows of label 0, then ``per_class`` of label 1 with ``sample``.

    Raises:
        DataError: a class has fewer than ``per_class`` rows.
    """
    rng = random.Random(seed)
    chosen: set[int] = set()
    for label in (0, 1):
        members = [i for i, value in enumerate(labels) if value == label]  # ascending index = sorted (label, index)
        if len(members) < per_class:
            raise DataError(f"IMDB train has {len(members)} rows of label {label}; the validation carve-out needs "
                            f"{per_class} per class")
        chosen.update(rng.sample(members, per_class))
    return chosen


def _imdb_rows(name: str, config: str | None, split: str, where: str) -> RowIter:
    """Loads now (so a missing package or an offline machine fails at once), maps lazily."""
    source_split = "train" if split in ("train", "validation") else split
    raw = list(_load_hub_split(name, config, source_split))
    keep: Iterable[int] = range(len(raw))
    if source_split == "train":
        labels = [_require(row, "label", f"{where} {i + 1}") for i, row in enumerate(raw)]
        held_out = imdb_validation_rows(labels)
        keep = sorted(held_out) if split == "validation" else [i for i in keep if i not in held_out]
    return _imdb_mapped(raw, keep, source_split, where)


def _imdb_mapped(raw: list[Row], keep: Iterable[int], source_split: str, where: str) -> RowIter:
    for i in keep:
        row = dict(raw[i])
        label = _require(row, "label", f"{where} {i + 1}")
        if label not in IMDB_LABELS:
            raise DataError(f"{where} {i + 1}: label {label!r} is not one of {sorted(IMDB_LABELS)}")
        row["label"] = IMDB_LABELS[label]
        row.setdefault("id", f"imdb-{source_split}-{i}")
        yield row, f"{where} {i + 1}"


def _e2e_references(row: Row, where: str) -> list[str]:
    """All references of one hub row: GEM's ``references`` list, or the single ``human_reference``/``target``."""
    listed = row.get("references")
    if isinstance(listed, list) and listed:
        return [str(ref) for ref in listed]
    for key in ("human_reference", "target", "ref"):
        if key in row:
            return [row[key]]
    raise DataError(f"{where}: no reference field (human_reference, target, references); "
                    f"fields present: {', '.join(map(str, row))}")


def _e2e_rows(raw: Iterable[Row], split: str, where: str) -> RowIter:
    grouped: dict[str, tuple[list[str], int]] = {}
    for i, row in enumerate(raw, start=1):
        mr = _require(row, "meaning_representation", f"{where} {i}")
        refs = _e2e_references(row, f"{where} {i}")
        if split == "train":
            yield {"id": f"e2e-train-{i - 1:05d}", "meaning_representation": mr, "references": refs}, f"{where} {i}"
            continue
        group, _first = grouped.setdefault(mr, ([], i))
        if isinstance(row.get("references"), list) and row["references"]:
            group.extend(ref for ref in refs if ref not in group)  # GEM repeats the full list on every row
        else:
            group.extend(refs)
    for k, (mr, (refs, first)) in enumerate(grouped.items()):
        yield {"id": f"e2e-{split}-{k:04d}", "meaning_representation": mr, "references": refs}, f"{where} {first}"
