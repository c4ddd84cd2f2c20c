"""Run one function in a child process of its own and hand back its result: how ``peftlab compare`` runs each run.

A grid used to run every run in one long-lived process. Memory an earlier run left behind (allocator arenas, caches,
fragmentation) then counted in the next run's peak: two seeds of one CNN/DM LoRA run peaked at 8.2 and 11.1 GB.
In a child of its own every run starts from the same state, so its measured peak memory and speed are its own, and
a run the kernel kills (out of memory) is reported by name instead of taking the grid's process with it.

Children are forked from a ``forkserver`` that has imported torch and peftlab once (start-up costs well under a
second per run instead of the ~9 CPU-seconds of a fresh interpreter), and no child inherits the parent's memory,
threads or open files (the results folder's lock stays with the parent). A child stops when its parent dies.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# Imported once by the fork server, so that each child starts with them loaded.
PRELOAD = ["torch", "peftlab.lab.experiment"]


class RunProcessError(RuntimeError):
    """The child process ended without handing back a result or an exception (killed, or it exited)."""


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows: spawn only
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _die_with_parent() -> None:
    """Stop this process when the process that started it dies (killed, say), so that no orphan goes on training.

    The fork server is this process's OS parent and outlives a killed grid while any child runs, so the watch is on
    the starting process itself: multiprocessing's sentinel of it turns ready when it is gone.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="peftlab: parent watch", daemon=True).start()


def _child(conn: Any, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> None:
    _die_with_parent()
    try:
        payload: tuple = ("ok", fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - every exception goes back to the parent, interrupts included
        payload = ("error", exc, traceback.format_exc())
    try:
        conn.send(payload)
    except Exception as exc:  # noqa: BLE001 - the result or the exception does not pickle
        text = payload[2] if payload[0] == "error" else ""
        conn.send(("error", RuntimeError(f"the result could not be sent back: {exc}"), text))
    conn.close()


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        hint = " (the kernel's out-of-memory killer sends this: see `dmesg`)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code} without a result"


def _interrupt(proc: multiprocessing.process.BaseProcess, receive: Any, grace: float = 5.0) -> None:
    """After an interrupt here: let the child stop (a Ctrl-C at a terminal reached it too), pass the interrupt on if
    it is still running after ``grace`` seconds (only this process was signalled), and wait for it, reading what it
    sends meanwhile so that it never blocks on a full pipe."""
    deadline = time.monotonic() + grace
    signalled = False
    while proc.is_alive():
        if not signalled and time.monotonic() > deadline and proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)
            signalled = True
        try:
            if receive.poll(0.5):
                receive.recv()
        except (EOFError, OSError):
            proc.join()


def run_isolated(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a child process; its return value, or its exception raised here.

    ``fn``, its arguments and its result must pickle (module-level functions and plain data). An exception raised in
    the child is raised here as the same type, with the child's traceback attached as a note. An interrupt here
    (Ctrl-C) is passed on to the child, which is waited for, so that it stops the way an in-process run would.

    Args:
        what: names the work in errors (a grid run's stem).

    Raises:
        RunProcessError: the child ended without a result (killed by a signal, or ``os._exit``).
    """
    ctx = _context()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args, kwargs), name=f"peftlab: {what}")
    try:
        # Started inside the try: an interrupt that lands as start() returns must still reach the child, or this
        # process would exit while multiprocessing's exit handler waits for the child forever.
        proc.start()
        send.close()  # only the child writes; EOF here once it is gone
        try:
            message = receive.recv()
        except EOFError:
            message = None
        proc.join()
    except KeyboardInterrupt:
        _interrupt(proc, receive)
        raise
    finally:
        receive.close()
    if message is None:
        raise RunProcessError(f"{what}: the run's process {_describe_exit(proc.exitcode)}; results already written "
                              "are kept, and running the same command again resumes it from its last checkpoint")
    if message[0] == "ok":
        return message[1]
    _, exc, text = message
    if hasattr(exc, "add_note"):
        exc.add_note(f"in the process of {what}:\n{text.rstrip()}")
    raise exc
