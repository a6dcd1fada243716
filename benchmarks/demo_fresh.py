"""Benchmark: `make demo` as a newcomer runs it — a fresh clone, an empty uv cache, nothing running.

Times the install (`make setup`: every package downloaded again), then `make demo` (simulate → the
daily DAG through `airflow dags test` → API → example requests), reads the DAG's own time from the
line `uer airflow test` prints when it ends, and records whether the two users' results differed on
the broad query. The API the demo leaves running is stopped and the clone removed afterwards.
Writes benchmarks/results/demo.json; the full output is kept in artifacts/demo_fresh.log.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DAG_DONE = re.compile(r"airflow dags test uer_daily_retraining \S+ finished in ([\d.]+) s \(exit (\d+)\)")
SHARED = re.compile(r"the two users share (\d+) of (\d+) results: (.+)")


def timed(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, str]:
    """Run ``command``, echo and keep its output, return (seconds, output); raise on failure."""
    start = time.perf_counter()
    with log.open("a") as sink:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        lines = []
        for line in process.stdout:
            sys.stdout.write(line)
            sink.write(line)
            lines.append(line)
        code = process.wait()
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {code}; output in {log}")
    return time.perf_counter() - start, "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the clone (and its running API) afterwards")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="uer-demo-"))
    clone = scratch / "clone"
    env = {**os.environ, "UV_CACHE_DIR": str(scratch / "uv-cache")}
    env.pop("VIRTUAL_ENV", None)
    log = ROOT / "artifacts" / "demo_fresh.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    try:
        install, _ = timed(["make", "setup"], clone, env, log)
        demo, output = timed(["make", "demo"], clone, env, log)
    finally:
        if not args.keep:
            subprocess.run(["make", "api-stop"], cwd=clone, env=env, capture_output=True)
    dag = DAG_DONE.search(output)
    shared = SHARED.search(output)
    figures = {
        "fresh_machine": "fresh clone and an empty uv cache on this machine (every package downloaded again; "
                         "the torch CPU wheel comes from this machine kind's disk), nothing else running; "
                         "not a new VM",
        "install_seconds": round(install, 1),
        "demo_seconds": round(demo, 1),
        "total_seconds": round(install + demo, 1),
        "dag_seconds": float(dag.group(1)) if dag else None,
        "two_users_share": f"{shared.group(1)} of {shared.group(2)}" if shared else None,
        "personalized": shared.group(3).strip() if shared else None,
        "target_seconds": 900,
    }
    path = write_result("demo", figures, command="python benchmarks/demo_fresh.py  # make setup + make demo, "
                                                 "fresh clone, UV_CACHE_DIR empty")
    print(path.read_text())
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
