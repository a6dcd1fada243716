"""A real standalone Milvus 2.3 server (PyPI package ``milvus``, no Docker) for the 1M-product benchmark.

The server listens on nine ports (gRPC proxy, etcd, the coordinators and nodes, metrics) on all
interfaces, and its configuration cannot restrict that. So it runs in a private network namespace
(``unshare --net``: only its own ``lo``, which we bring up), and a small forwarder in the host namespace
listens on 127.0.0.1:<port> only and connects into the server's namespace: the listening socket is made
in the host namespace, then the forwarder joins the server's namespace with setns(2), so every
upstream connection it opens afterwards reaches the server's loopback. Nothing of the server is
reachable from outside this machine, nor even from the host's other loopback ports.

    python infra/milvus_standalone.py start [--port 19530] [--timeout 240]
    python infra/milvus_standalone.py status
    python infra/milvus_standalone.py stop [--wipe]

Data: ``data/milvus_standalone/`` (``stop --wipe`` removes it; it grows with every collection built).
Logs: ``data/logs/milvus_standalone.log`` (server stdout/stderr; Milvus's own logs are in the data dir)
and ``data/logs/milvus_forwarder.log``. Pid files: ``data/milvus_standalone.pid``,
``data/milvus_forwarder.pid``. Needs root (``unshare --net``) and the ``bench-milvus`` dependency group
(``make milvus-start`` installs it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
SERVER_DIR = DATA / "milvus_standalone"
LOGS = DATA / "logs"
SERVER_PID = DATA / "milvus_standalone.pid"
FORWARDER_PID = DATA / "milvus_forwarder.pid"
SERVER_LOG = LOGS / "milvus_standalone.log"
FORWARDER_LOG = LOGS / "milvus_forwarder.log"
UPSTREAM_PORT = 19530  # the server's gRPC proxy port inside its namespace
CLONE_NEWNET = 0x40000000
STOP_GRACE_S = 30.0  # Milvus 2.3 ignores SIGTERM in practice (minutes): then the whole process group gets SIGKILL


# -- helpers ----------------------------------------------------------------------------------------


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive for our purposes
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _join_netns(pid: int) -> None:
    """Move this (single-threaded) process into the network namespace of ``pid``."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into the network namespace of {pid}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _host_listeners_of(pids: set[int]) -> list[str]:
    """Host-namespace listening sockets owned by ``pids`` (there must be none for the server)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if any(f"pid={p}," in line for p in pids)]


def _wildcard_listeners() -> list[str]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if line.split()[3].startswith(("0.0.0.0:", "*:", "[::]:"))]


# -- inside the namespace: the server itself ---------------------------------------------------------


def _server(data_dir: Path, overrides: list[str]) -> None:
    """Runs as ``unshare --net -- python this _server``: bring lo up, write the config, exec milvus.
    ``overrides`` (``key=value``, from ``start --set``) are applied last."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    from milvus import MilvusServerConfig, _initialize_data_files

    config = MilvusServerConfig(data_dir=str(data_dir))
    # Milvus waits this long for in-flight tasks on SIGTERM; we SIGKILL after STOP_GRACE_S anyway.
    config.set("common.gracefulStopTimeout", 10)
    config.set("log.level", "warn")  # info logs every request: disk and CPU the benchmark should not pay
    # The message log (rocksmq) keeps every insert for 3 days / 8 GB by default: 1M 640-d rows are 2.6 GB a build.
    config.set("rocksmq.retentionTimeInMinutes", 30)
    config.set("rocksmq.retentionSizeInMB", 2048)
    # Growing segments are sealed at sealProportion x maxSize (MB), and every search visits each segment's
    # index. The defaults (0.23 x 512 MB) cut 1M 643-d products into ~22 segments of 45k rows; 0.5 x 1024 MB
    # gives 6 of ~165k at 774-d (serving.json: recall@100 0.997 at ef 200, index wait 537 s and 951 s on two
    # machines). Larger was tried (benchmarks/serving.py --products 1000000, a run the publish gate stopped)
    # and is worse here: 0.9 x 4096 MB let compaction merge them into 520k + 480k segments after they had
    # been indexed, so every row was indexed twice (index wait 969 s), and at ef 200 recall@100 fell to
    # 0.960 (fewer segments merge fewer candidates).
    # One segment of all 1M rows (maxSize 4096, sealProportion 0.9, maxBinlogFileNumber 256 so that 16 MB
    # binlogs do not seal it first) was tried too: built and loaded (index wait 563 s), it answered with
    # recall@100 0.09-0.12 at ef 100-400 and the proxy logged "the length (topk) between all result of
    # query is different" (a 3.1 GB segment; /tmp experiment, no result file); so did one segment of 1M 256-d
    # rows (1 GB): recall@100 0.23-0.28 at ef 100-400 (benchmarks/index_types.py --rows 1000000, not kept).
    # The served vectors are narrowed to 262-d (boost.serving_dim 256). Sealing them at ~340k rows (0.35 x
    # 1024 MB: 3 segments + a remainder) was tried at 1M: compaction then merged the remainder and two sealed
    # segments into one of 710k rows and indexed it again while the benchmark's rates ran (Milvus 1.05-1.27
    # cores at 100-200 rps; an interrupted run, no result file). Compaction treats segments under half of
    # maxSize as small and merges them up to maxSize, so the seal size stays at half of maxSize, as in the
    # measured 774-d setup: 0.5 x 346 MB seals 262-d rows at ~150k, 6 segments per 1M as before (serving.json of
    # 2026-12-06: 150k-240k rows, index wait 274 s, recall@100 0.992 at ef 100; 508 s at 774-d on 2026-12-04), each walk
    # over 262-d rows (index_types.json: 0.45 vs 0.70 ms of Milvus CPU per query per 165k-row segment).
    config.set("dataCoord.segment.maxSize", 346)
    config.set("dataCoord.segment.sealProportion", 0.5)
    for item in overrides:  # experiments: `start --set queryNode.segcore.knowhereThreadPoolNumRatio=1`
        key, _, value = item.partition("=")
        config.set(key, value)
    config.resolve()  # every port is free in a fresh namespace: the template's defaults (proxy 19530)
    proxy = config.get("proxy_port")
    if proxy != UPSTREAM_PORT:
        raise SystemExit(f"the server would listen on {proxy}, not {UPSTREAM_PORT}, inside its namespace")
    _initialize_data_files(config.base_data_dir)  # unpacks the binary and its libraries under data_dir/bin
    binary = os.path.join(config.base_data_dir, "bin", "milvus")
    env = {**os.environ, "DEPLOY_MODE": "STANDALONE", "METRICS_PORT": "9091",
           "MILVUS_RUN_DIR": os.path.join(config.base_data_dir, "run"),
           "LD_LIBRARY_PATH": os.path.dirname(binary) + ":" + os.environ.get("LD_LIBRARY_PATH", "")}
    os.chdir(config.base_data_dir)
    sys.stdout.flush()
    os.execve(binary, [binary, "run", "standalone"], env)


# -- the forwarder: host 127.0.0.1:port → the server's namespace --------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _forward_main(listener: socket.socket, server_pid: int, upstream_port: int) -> None:
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:
            client_writer.close()
            return
        for writer in (client_writer, up_writer):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(_pipe(client_reader, up_writer), _pipe(up_reader, client_writer))

    server = await asyncio.start_server(handle, sock=listener, backlog=512)
    async with server:
        while _alive(server_pid):  # the forwarder goes when the server goes
            await asyncio.sleep(1.0)


def _forward(server_pid: int, port: int, upstream_port: int) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))  # in the host namespace, loopback only
    listener.listen(512)
    listener.setblocking(False)
    _join_netns(server_pid)  # from here on, new sockets (the upstream connections) live in the server's netns
    try:
        import uvloop  # noqa: F401 - faster event loop when installed (bentoml's uvicorn usually brings it)

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(_forward_main(listener, server_pid, upstream_port))


# -- start / stop / status ----------------------------------------------------------------------------


def _wait_ready(port: int, server_pid: int, timeout_s: float) -> float:
    """Seconds until pymilvus lists the collections through the forwarder (raise on timeout / death)."""
    from pymilvus import MilvusClient

    start = time.monotonic()
    last = "no answer yet"
    while time.monotonic() - start < timeout_s:
        if not _alive(server_pid):
            raise SystemExit(f"the Milvus server (pid {server_pid}) exited during start-up: see {SERVER_LOG} and "
                             f"{SERVER_DIR / 'logs'}")
        try:
            client = MilvusClient(uri=f"http://127.0.0.1:{port}", timeout=5)
            client.list_collections()
            client.close()
            return time.monotonic() - start
        except Exception as exc:  # noqa: BLE001 - pymilvus raises several types while the server boots
            last = f"{type(exc).__name__}: {str(exc)[:200]}"
        time.sleep(2.0)
    raise SystemExit(f"Milvus did not answer list_collections on 127.0.0.1:{port} within {timeout_s:.0f} s "
                     f"(last error: {last}); see {SERVER_LOG}. Stop it with `make milvus-stop`.")


def start(port: int, timeout_s: float, overrides: list[str] | None = None) -> None:
    if os.geteuid() != 0:
        raise SystemExit("`unshare --net` needs root")
    bad = [item for item in overrides or [] if "=" not in item]
    if bad:
        raise SystemExit(f"--set takes key=value (a dotted Milvus config key), not {bad}")
    server_pid, forwarder_pid = _read_pid(SERVER_PID), _read_pid(FORWARDER_PID)
    if server_pid and forwarder_pid:
        if overrides:
            raise SystemExit(f"Milvus standalone is already running (server pid {server_pid}): its config cannot "
                             f"change; `make milvus-stop` first to start it with {overrides}")
        print(f"Milvus standalone already running (server pid {server_pid}, forwarder pid {forwarder_pid})")
        _wait_ready(port, server_pid, timeout_s)
        print(f"Milvus standalone ready on http://127.0.0.1:{port}")
        return
    if server_pid or forwarder_pid:
        print("a half-started Milvus standalone was found: stopping it first")
        stop(wipe=False)
    if _listening(port):
        raise SystemExit(f"something already listens on 127.0.0.1:{port}: not starting")
    try:
        import milvus  # noqa: F401
    except ImportError as exc:
        raise SystemExit("the `milvus` package is missing: `uv sync --group bench-milvus` (make milvus-start)") from exc
    SERVER_DIR.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    before = set(_wildcard_listeners())
    with SERVER_LOG.open("ab") as log:
        server = subprocess.Popen(["unshare", "--net", "--", sys.executable, __file__, "_server",
                                   "--data-dir", str(SERVER_DIR), *(f"--set={item}" for item in overrides or [])],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, cwd=ROOT)
    SERVER_PID.write_text(str(server.pid))
    # the pid is the server's (unshare and python exec in place), and so is the namespace behind it
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.poll() is None:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{server.pid}/ns/net") != os.readlink("/proc/self/ns/net"):
                break
        time.sleep(0.05)
    if server.poll() is not None:
        raise SystemExit(f"the server exited at once ({server.returncode}): see {SERVER_LOG}")
    with FORWARDER_LOG.open("ab") as log:
        forwarder = subprocess.Popen([sys.executable, __file__, "_forward", "--server-pid", str(server.pid),
                                      "--port", str(port)], stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    FORWARDER_PID.write_text(str(forwarder.pid))
    try:
        seconds = _wait_ready(port, server.pid, timeout_s)
    except SystemExit:
        stop(wipe=False)
        raise
    leaked = _host_listeners_of({server.pid})
    if leaked:
        stop(wipe=False)
        raise SystemExit("refusing to keep a server with sockets in the host namespace:\n" + "\n".join(leaked))
    new_wildcard = sorted(set(_wildcard_listeners()) - before)
    if new_wildcard:  # another process of this machine, started meanwhile (the server's are never visible here)
        print("note: new listeners on all interfaces appeared during start-up (not the server's):", *new_wildcard,
              sep="\n  ")
    print(f"Milvus standalone ready on http://127.0.0.1:{port} after {seconds:.0f} s (server pid {server.pid} in "
          f"its own network namespace, forwarder pid {forwarder.pid}; data {SERVER_DIR}, log {SERVER_LOG})")


def _stop_group(pid: int, name: str, grace_s: float) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.25)
    if _alive(pid):
        print(f"{name} (pid {pid}) still running {grace_s:.0f} s after SIGTERM: SIGKILL to its process group")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)


def stop(wipe: bool) -> None:
    forwarder_pid, server_pid = _read_pid(FORWARDER_PID), _read_pid(SERVER_PID)
    if forwarder_pid:
        _stop_group(forwarder_pid, "forwarder", 5.0)
    if server_pid:
        _stop_group(server_pid, "Milvus standalone", STOP_GRACE_S)
    for path in (FORWARDER_PID, SERVER_PID):
        path.unlink(missing_ok=True)
    if wipe:
        shutil.rmtree(SERVER_DIR, ignore_errors=True)
    print("Milvus standalone stopped" + (f"; {SERVER_DIR} removed" if wipe else "")
          if forwarder_pid or server_pid else "Milvus standalone was not running" + ("; data wiped" if wipe else ""))


def status(port: int) -> int:
    server_pid, forwarder_pid = _read_pid(SERVER_PID), _read_pid(FORWARDER_PID)
    print(f"server pid: {server_pid or 'not running'}; forwarder pid: {forwarder_pid or 'not running'}; "
          f"127.0.0.1:{port} answers TCP: {_listening(port)}")
    if server_pid:
        print("host-namespace listeners of the server (must be none):", _host_listeners_of({server_pid}) or "none")
    if forwarder_pid:
        print("forwarder listeners:", *_host_listeners_of({forwarder_pid}), sep="\n  ")
    if SERVER_DIR.exists():
        used = subprocess.run(["du", "-sh", str(SERVER_DIR)], capture_output=True, text=True).stdout.split()
        print(f"data dir {SERVER_DIR}: {used[0] if used else '?'}")
    return 0 if server_pid and forwarder_pid else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="start the server in its own network namespace and the loopback forwarder")
    p.add_argument("--port", type=int, default=19530, help="host port on 127.0.0.1")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for list_collections")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a Milvus config key (repeatable; e.g. queryNode.grouping.maxNQ=64)")
    p = sub.add_parser("stop", help="stop the forwarder and the server")
    p.add_argument("--wipe", action="store_true", help=f"also remove {SERVER_DIR}")
    p = sub.add_parser("status")
    p.add_argument("--port", type=int, default=19530)
    p = sub.add_parser("_server")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--set", action="append", default=[])
    p = sub.add_parser("_forward")
    p.add_argument("--server-pid", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream-port", type=int, default=UPSTREAM_PORT)
    args = parser.parse_args()
    if args.command == "start":
        start(args.port, args.timeout, args.set)
    elif args.command == "stop":
        stop(args.wipe)
    elif args.command == "status":
        raise SystemExit(status(args.port))
    elif args.command == "_server":
        _server(args.data_dir, args.set)
    else:
        _forward(args.server_pid, args.port, args.upstream_port)


if __name__ == "__main__":
    main()
