"""Durable writes: nothing half-written is ever taken for finished, and nothing visible is lost to a power cut.

The order databases use, for a file::

    write <dir>/.<name>.XXXX.tmp -> flush -> fsync(file) -> rename onto <name> -> fsync(<dir>)

and for a folder (checkpoints, adapters, exported/merged models)::

    mkdtemp <parent>/.<name>.XXXX.tmp -> write every file -> fsync each file and sub-folder -> fsync the temp folder
    -> rename onto <name> -> fsync(<parent>)

The rename is the pointer that makes the data visible. Because the data are on disk before it moves, a crash or a
power cut before the rename leaves only a ``.<name>.*.tmp`` leftover (readers never look at dot-names; the next
writer of that folder removes them) and the previous version intact; after the parent's fsync the new version is
durable. Without the file fsyncs, ext4/xfs may persist the rename before the data, and a power cut would leave a
complete-looking file of zeros or of length 0.

Disk errors (full disk, quota, read-only file system, no permission) become :class:`DiskWriteError`, a
``ValueError`` the command line prints as one line naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Errors of the storage, not of peftlab: the user fixes them (free space, remount, another out folder).
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


class DiskWriteError(ValueError):
    """A write failed because of the storage (full, read-only, no permission); the message names the path."""


def is_disk_error(exc: BaseException) -> bool:
    """True for an ``OSError`` the user fixes at the storage (ENOSPC, EDQUOT, EROFS, EACCES, EPERM, EFBIG)."""
    return isinstance(exc, OSError) and exc.errno in DISK_ERRNOS


@contextlib.contextmanager
def disk_errors(path: str | Path, note: str = "") -> Iterator[None]:
    """Turn a storage ``OSError`` raised inside into :class:`DiskWriteError` naming ``path`` (+ ``note``)."""
    try:
        yield
    except OSError as exc:
        if not is_disk_error(exc):
            raise
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise DiskWriteError(f"could not write {path}: {reason}" + (f"; {note}" if note else "")) from exc


def save_tensors(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the usual file permissions, whose I/O failures (a Rust
    ``SafetensorError`` with the OS error in its text) are raised as the ``OSError`` they are, so that
    :func:`disk_errors` and callers see a full disk as one."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata=metadata)
    except Exception as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None or isinstance(exc, OSError):
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from exc
    # safetensors creates its files 0600; an adapter or checkpoint gets the permissions any other file would.
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def fsync_dir(folder: str | Path) -> None:
    """fsync a directory, so that the names created/renamed in it survive a power cut."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """fsync a file's data and size (opened read-only: fsync flushes the inode whatever the descriptor's mode)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: str | Path) -> None:
    """fsync every file and folder under ``folder`` (deepest first), then ``folder`` itself."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_file(Path(root) / name)
        for name in dirs:
            fsync_dir(Path(root) / name)
    fsync_dir(folder)


def write_bytes_durably(path: str | Path, data: bytes) -> None:
    """The file protocol above, raising plain ``OSError`` (callers that know more wrap it, see :func:`disk_errors`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` durably; a storage error raises :class:`DiskWriteError`, ``path`` untouched."""
    with disk_errors(path, "the previous version, if any, is intact"):
        write_bytes_durably(path, data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` durably, see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` durably, see :func:`atomic_write_bytes`."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def remove_leftovers(parent: str | Path, name: str) -> None:
    """Delete ``.<name>.*.tmp`` folders/files a killed writer left in ``parent`` (call only while no other process
    can be writing there: under the run lock, or for a folder name only this process writes)."""
    for stale in Path(parent).glob(f".{name}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def durable_folder(final: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it is synced and renamed onto ``final``.

    Args:
        final: the folder to create.
        replace: an existing ``final`` is replaced (moved aside, then deleted after the rename); with False the
            caller has checked that ``final`` does not exist or is empty.

    Raises plain ``OSError`` on storage errors (wrap in :func:`disk_errors`); the temporary folder is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes a private folder; the result is an ordinary one
        sync_tree(tmp)
        _rename_folder(tmp, final, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing is left there after a successful rename
    fsync_dir(final.parent)


def _rename_folder(tmp: Path, final: Path, replace: bool) -> None:
    """Put ``tmp`` at ``final``; a folder cannot be renamed onto a non-empty one, so an old one goes aside first."""
    if final.is_dir() and replace and any(final.iterdir()):
        old = final.with_name(f".{final.name}.old.tmp")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return
    if final.is_dir():
        final.rmdir()  # empty (the caller checked, or it held nothing to keep)
    os.replace(tmp, final)
