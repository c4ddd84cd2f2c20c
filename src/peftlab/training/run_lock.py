"""One process per output folder: ``<folder>/.lock``, held with ``flock`` for as long as the process works there.

A second ``peftlab train``/``eval``/``compare`` pointed at the same folder would interleave checkpoints, metrics
records and result files; it is refused at once with the folder and the PID of the holder. The lock is an advisory
``flock`` on an open file, which the kernel releases when the holder exits in any way, ``kill -9`` included, so a
lock file left behind by a killed process never blocks (its content is only the last holder's PID, for messages).

Under ``torchrun`` only rank 0 writes files, so only rank 0 takes the lock (callers pass ``enabled=is_main``).
On a platform without ``fcntl`` (Windows) no lock is taken.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from peftlab.durable import disk_errors

LOCK_NAME = ".lock"


class FolderLockedError(ValueError):
    """The folder cannot be locked: another live process holds it (the message names its PID), or it is a file."""


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid else "a process whose pid is not recorded"


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "out", enabled: bool = True,
                name: str = LOCK_NAME) -> Iterator[None]:
    """Hold ``<folder>/<name>`` (``.lock``) inside the block; raises :class:`FolderLockedError` at once when it is
    taken.

    Args:
        folder: the run or results folder (created when missing).
        what: the setting that named the folder, for the message (``out``, ``results``).
        enabled: False takes no lock (a non-zero rank of a multi-process run).
        name: the lock file's name (a dot-name): compare's shards each hold their own in one results folder.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        enabled = False
    if not enabled:
        yield
        return
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FolderLockedError(f"{what}: {folder} is a file; give a folder")
    path = folder / name
    with disk_errors(path, f"{what} must be a writable folder"):
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderLockedError(
                f"{what}: {folder} is in use by another peftlab process ({_holder(path)}, lock {path}); wait for it "
                f"to finish or choose another {what}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the flock
