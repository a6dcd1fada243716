"""Benchmark: `make setup` as on a fresh machine — a fresh clone and an empty uv cache.

Everything is downloaded from the package registry again (torch comes from the CPU wheel that this
kind of machine keeps on disk). Writes benchmarks/results/setup.json.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="uer-setup-"))
    clone, cache = scratch / "clone", scratch / "uv-cache"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    env_cmd = ["env", f"UV_CACHE_DIR={cache}", "make", "setup"]
    start = time.perf_counter()
    subprocess.run(env_cmd, check=True, cwd=clone)
    first = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run(env_cmd, check=True, cwd=clone)
    again = time.perf_counter() - start
    venv_mb = sum(p.stat().st_size for p in (clone / ".venv").rglob("*") if p.is_file()) / 2**20
    path = write_result("setup", {
        "fresh_machine": "fresh clone, empty uv cache (packages downloaded from the registry)",
        "install_seconds": round(first, 1), "repeat_seconds": round(again, 1), "venv_mb": round(venv_mb),
    }, command="make bench-setup  # = UV_CACHE_DIR=<empty> make setup, in a fresh clone, twice")
    print(path.read_text())
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
