"""Print how the packages installed in this environment differ from a lock file (``make test-latest``).

Usage: ``python tools/lock_diff.py requirements/lock.txt [requirements/model.txt ...]``. Exit status 0 either way:
the differences are what ``make lock`` would adopt once the suite passes on them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lockfile import installed_versions, read_lock  # noqa: E402


def main(lock_paths: list[str]) -> None:
    locked = {name: pin for path in lock_paths for name, pin in read_lock(path).items()}
    lock_path = " + ".join(lock_paths)
    installed = installed_versions()
    rows = []
    for name in sorted(set(locked) | set(installed)):
        want = locked[name].version if name in locked else "-"
        have = installed.get(name, "-")
        if want != have:
            rows.append((name, want, have))
    if not rows:
        print(f"installed packages match {lock_path} exactly")
        return
    width = max(len(r[0]) for r in rows)
    print(f"{len(rows)} package(s) differ from {lock_path} (locked -> installed here):")
    for name, want, have in rows:
        print(f"  {name:<{width}}  {want} -> {have}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["requirements/lock.txt", "requirements/model.txt"])
