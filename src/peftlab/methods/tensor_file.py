"""Adapter weight files (safetensors) read defensively: the header is checked before any tensor is allocated.

Adapter folders are handed around (downloads, colleagues, PEFT's hub), so a file may be truncated, tampered with
or built to make us allocate terabytes. A safetensors file is::

    8 bytes        N, the header length (unsigned, little-endian)
    N bytes        JSON {name: {"dtype": "F32", "shape": [d0, d1], "data_offsets": [begin, end]}, ...,
                         "__metadata__": {str: str}}
    the rest       the data buffer; each tensor's bytes are buffer[begin:end]

:func:`read_header` checks that this structure is consistent with the file's size (every byte range inside the
file, every range exactly dtype size x prod(shape) long); :func:`load_adapter_tensors` adds the checks against what
the model can hold (floating-point dtypes, a byte budget from its trainable set) and only then lets safetensors read
the data. Every adapter and PEFT load path goes through it; nothing here unpickles.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

# safetensors refuses longer headers too; checked here first so the message names the file.
MAX_HEADER_BYTES = 100 * 2**20
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
               "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# The widest floating-point dtype: a byte budget of numel x this admits every legitimate file.
MAX_FLOAT_BYTES = 8


class TensorFileError(ValueError):
    """An adapter weight file that is unreadable, inconsistent or does not fit the model; the message names it."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_header(path: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensors and metadata a safetensors file declares, after checking them against the file's size.

    Only the header is read (at most :data:`MAX_HEADER_BYTES`), never the data.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        TensorFileError: the file is truncated, the header is not JSON, or a tensor's dtype, shape or byte range
            is inconsistent (the tensor is named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file" + (" (it is a folder)" if path.is_dir() else ""))
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if size < 8:
            raise TensorFileError(f"{path}: truncated ({size} bytes); a safetensors file starts with an 8-byte "
                                  "header length")
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise TensorFileError(f"{path}: header length {length} bytes, but the file has {size - 8} bytes after "
                                  f"the length field (limit {MAX_HEADER_BYTES}): truncated or not a safetensors file")
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorFileError(f"{path}: the safetensors header is not valid JSON ({exc}); damaged file") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: the safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TensorFileError(f"{path}: __metadata__ must map names to strings")
    entries = {name: _entry(name, spec, path) for name, spec in header.items()}
    _check_layout(entries, {name: spec["data_offsets"] for name, spec in header.items()}, size - 8 - length, path)
    return entries, metadata


def _entry(name: str, spec: object, path: Path) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= set(spec):
        raise TensorFileError(f"{where}: expected {{dtype, shape, data_offsets}}, got {str(spec)[:200]}")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise TensorFileError(f"{where}: unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise TensorFileError(f"{where}: shape must be a list of integers >= 0, got {str(shape)[:200]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise TensorFileError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    nbytes = DTYPE_BYTES[dtype] * math.prod(shape)  # Python ints: an absurd shape cannot overflow
    if offsets[1] - offsets[0] != nbytes:
        raise TensorFileError(f"{where}: dtype {dtype} x shape {shape} needs {nbytes} bytes, but its byte range "
                              f"{offsets} holds {offsets[1] - offsets[0]}")
    return TensorEntry(dtype, tuple(shape), nbytes)


def _check_layout(entries: Mapping[str, TensorEntry], offsets: Mapping[str, list[int]], buffer: int,
                  path: Path) -> None:
    """Every byte range inside the data buffer, and the ranges tiling it without gaps or overlaps."""
    end = 0
    for name in sorted(offsets, key=lambda n: offsets[n]):
        begin, stop = offsets[name]
        if stop > buffer:
            raise TensorFileError(f"{path}: tensor {name!r} ends at byte {stop} of the data, but the file holds "
                                  f"{buffer} data bytes: truncated")
        if begin != end:
            raise TensorFileError(f"{path}: tensor {name!r} starts at byte {begin}, expected {end} (overlapping or "
                                  "gapped byte ranges)")
        end = stop
    if end != buffer:
        raise TensorFileError(f"{path}: {buffer - end} bytes after the last tensor; the file is damaged")


def check_fits(entries: Mapping[str, TensorEntry], path: Path, max_bytes: int | None) -> None:
    """The declared tensors against what the model can take, before any of them is read. Names and shapes are the
    method's to check (``load_adapter_state_dict``; prefix tuning takes two layouts), once the bytes are bounded.

    Raises:
        TensorFileError: a non-float dtype, or a total over ``max_bytes`` (None: no budget).
    """
    not_float = [f"{n} ({e.dtype})" for n, e in entries.items() if e.dtype not in FLOAT_DTYPES]
    if not_float:
        raise TensorFileError(f"{path}: adapter weights must be floating point ({', '.join(FLOAT_DTYPES)}); "
                              f"found {', '.join(not_float[:3])}")
    total = sum(e.nbytes for e in entries.values())
    if max_bytes is not None and total > max_bytes:
        raise TensorFileError(f"{path}: declares {total} bytes of tensors, more than this model's adapter can hold "
                              f"({max_bytes} bytes); refused before reading")


def load_adapter_tensors(path: str | Path, max_bytes: int | None = None) -> tuple[dict[str, torch.Tensor],
                                                                                  dict[str, str]]:
    """Every tensor of an adapter weight file and its metadata, read only after :func:`read_header` and
    :func:`check_fits` passed.

    Raises:
        FileNotFoundError: no such file.
        TensorFileError: see :func:`read_header` and :func:`check_fits`; a read error from safetensors is reported
            with the file's name too.
    """
    path = Path(path)
    entries, metadata = read_header(path)
    check_fits(entries, path, max_bytes)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in entries}, metadata
    except SafetensorError as exc:
        raise TensorFileError(f"{path}: cannot read as safetensors: {exc}") from None


def byte_budget(parameters: Mapping[str, torch.Tensor]) -> int:
    """The most tensor bytes a legitimate adapter for ``parameters`` can declare (every value in float64)."""
    return MAX_FLOAT_BYTES * sum(p.numel() for p in parameters.values())
