"""Read pip-compile's lock files (``name==version \\ --hash=sha256:...`` entries): shared by the lock tools and the
test that keeps pyproject.toml, requirements/pins.in and the lock in agreement."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

# Installed but never locked: the installer itself and the project (installed editable from its own folder).
NOT_LOCKED = frozenset({"pip", "peftlab"})

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


@dataclass
class Pin:
    """One locked distribution: its exact version and the sha256 of every file pip may install for it."""

    name: str
    version: str
    hashes: list[str] = field(default_factory=list)
    line: int = 0


def canonical(name: str) -> str:
    """PEP 503 normalised project name (``Foo_Bar`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str | Path) -> dict[str, Pin]:
    """Every ``name==version`` entry of a lock file with its hashes, keyed by canonical name.

    Raises:
        ValueError: a line is neither a pin, a hash, a comment nor blank (names the file and line), or a name is
            pinned twice.
    """
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("--hash") else raw.strip()
        if not line:
            continue
        if match := _PIN.match(line):
            name = canonical(match.group(1))
            if name in pins:
                raise ValueError(f"{path}:{number}: {name} is pinned twice")
            current = pins[name] = Pin(name, match.group(2), line=number)
        elif line.startswith("--hash") and current is not None:
            current.hashes.extend(_HASH.findall(line))
        else:
            raise ValueError(f"{path}:{number}: expected 'name==version \\' or '--hash=sha256:...', got {raw!r}")
        if not line.endswith("\\"):
            current = None
    return pins


def installed_versions() -> dict[str, str]:
    """{canonical name: version} of every distribution in this environment except :data:`NOT_LOCKED`."""
    found = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    return {name: version for name, version in found.items() if name not in NOT_LOCKED}
