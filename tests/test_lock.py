"""The committed lock (requirements/lock.txt) agrees with pyproject.toml's ranges and pins, and `make`'s
environment is exactly the lock: so a fresh machine's `make test` installs what CI tested."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from lockfile import canonical, installed_versions, read_lock  # noqa: E402

LOCK = ROOT / "requirements" / "lock.txt"
MODEL_LOCK = ROOT / "requirements" / "model.txt"


def make_extras() -> list[str]:
    """The extras the Makefile installs and locks (its ``EXTRAS :=`` line)."""
    match = re.search(r"^EXTRAS := (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, "Makefile has no 'EXTRAS := ...' line"
    return match.group(1).split(",")


def requirements() -> list[Requirement]:
    """pyproject.toml's dependencies plus those of the extras make installs, plus requirements/pins.in."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in make_extras():
        lines += project["optional-dependencies"][extra]
    pins = (ROOT / "requirements" / "pins.in").read_text().splitlines()
    lines += [line for line in pins if line.strip() and not line.startswith("#")]
    return [Requirement(line) for line in lines]


def test_every_requirement_is_locked_inside_its_range():
    locked = read_lock(LOCK)
    for req in requirements():
        pin = locked.get(canonical(req.name))
        assert pin is not None, f"{req.name} is required by pyproject.toml/pins.in but not in {LOCK.name}: make lock"
        # The CPU build's local label (+cpu) is not part of the range.
        assert req.specifier.contains(pin.version.split("+")[0], prereleases=True), (
            f"{LOCK.name} pins {req.name}=={pin.version}, outside pyproject's {req}: make lock")


def test_every_pin_has_a_hash_and_the_lock_was_made_with_makes_extras():
    locked = read_lock(LOCK) | read_lock(MODEL_LOCK)
    assert all(len(pin.hashes) >= 1 for pin in locked.values())
    header = LOCK.read_text().split("\n\n", 1)[0]
    assert sorted(re.findall(r"--extra=(\S+)", header)) == sorted(make_extras())
    assert locked["torch"].version == "2.13.0+cpu"  # the CPU build on this kind of machine, not a CUDA one


def test_read_lock_names_the_line_of_a_bad_entry(tmp_path):
    bad = tmp_path / "lock.txt"
    bad.write_text("numpy==2.0 \\\n    --hash=sha256:" + "0" * 64 + "\nnot a pin\n")
    with pytest.raises(ValueError, match=r"lock\.txt:3: expected"):
        read_lock(bad)


@pytest.mark.skipif(not (Path(sys.prefix) / ".peftlab-installed").exists(),
                    reason="not make's environment (the lock applies to `make setup` only)")
def test_makes_environment_is_exactly_the_lock():
    locked = read_lock(LOCK) | read_lock(MODEL_LOCK)
    installed = installed_versions()
    drift = {name: (pin.version, installed.get(name)) for name, pin in locked.items()
             if installed.get(name) != pin.version}
    extra = set(installed) - set(locked)
    assert not drift and not extra, f"environment differs from the lock: {drift}, unlocked: {sorted(extra)}"
