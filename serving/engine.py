"""The Milvus engine, reached by the URI in the settings (one code path for Milvus Lite and a cluster).

In the local profile Milvus Lite runs as a gRPC server bound to 127.0.0.1 (its own default host is
0.0.0.0: we always pass the host), so the retrieval API and the refresh job can share one data
directory; ``ensure_server`` starts it when nothing answers on the configured port, and refuses one that
serves another data directory.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from retrieval_core.errors import OperatorError
from retrieval_core.settings import Settings


class EngineUnavailable(OperatorError, RuntimeError):
    """Milvus cannot be reached: the caller answers 503 and retries later."""


_LOOPBACK = ("127.0.0.1", "localhost")


def _host_port(uri: str) -> tuple[str, int] | None:
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or parsed.hostname is None:
        return None
    return parsed.hostname, parsed.port or 19530


def _listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def server_data_dir(settings: Settings) -> Path:
    return settings.data_dir / "milvus"


def _served_data_dir(port: int) -> Path | None:
    """The data directory of the Milvus Lite server listening on ``port``; None when the listener is not one
    (another Milvus the settings point at) or cannot be seen."""
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if conn.status != psutil.CONN_LISTEN or conn.laddr.port != port or not conn.pid:
            continue
        try:
            command = psutil.Process(conn.pid).cmdline()
        except psutil.Error:
            return None
        if "--data-dir" in command and any(part.endswith("milvus-lite") for part in command):
            return Path(command[command.index("--data-dir") + 1]).resolve()
        return None
    return None


def ensure_server(settings: Settings, wait_s: float = 30.0) -> subprocess.Popen | None:
    """Start the embedded Milvus Lite server if the settings ask for one and it is down.

    A Milvus Lite server already on the port is used only if it serves this settings' data directory: the
    server outlives the command that started it, and another checkout's would silently take this one's
    collections (raises :class:`EngineUnavailable` saying whose it is). Returns the process when this call
    started it (the caller may stop it), else None."""
    address = _host_port(settings.milvus.uri)
    if not settings.milvus.embedded_server or address is None:
        return None
    host, port = address
    data_dir = server_data_dir(settings)
    if _listening(*address):
        served = _served_data_dir(port) if host in _LOOPBACK else None
        if served is not None and served != data_dir.resolve():
            raise EngineUnavailable(
                f"{settings.milvus.uri} is a Milvus Lite server of another data directory ({served}), not this "
                f"one's ({data_dir}): stop it (`make api-stop` in its checkout) or give this one a free port "
                f"(UER_MILVUS__URI=http://127.0.0.1:<port>)")
        return None
    if host not in _LOOPBACK:
        raise ValueError(f"the embedded Milvus server only binds loopback; milvus.uri host is {host!r}")
    data_dir.mkdir(parents=True, exist_ok=True)
    log = (data_dir / "server.log").open("ab")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("milvus-lite")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data_dir)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if _listening("127.0.0.1", port):
            return process
        if process.poll() is not None:
            raise EngineUnavailable(f"Milvus Lite server exited with {process.returncode}; "
                                    f"see {data_dir / 'server.log'}")
        time.sleep(0.2)
    process.kill()
    raise EngineUnavailable(f"Milvus Lite server did not listen on 127.0.0.1:{port} within {wait_s:.0f} s")


def connect(settings: Settings, start_server: bool = True, attempts: int = 4):  # noqa: ANN201 - pymilvus.MilvusClient
    """A client for the configured Milvus; raises :class:`EngineUnavailable` with the URI if it is down."""
    from pymilvus import MilvusClient

    if start_server:
        ensure_server(settings)
    uri = settings.milvus.uri
    if not uri.startswith(("http://", "https://")):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    token = settings.milvus.token.get_secret_value() if settings.milvus.token else ""
    # A busy server can refuse a new channel for a moment (e.g. Milvus Lite's gRPC "too many pings"
    # GOAWAY while other clients keep their connections alive): retry briefly before giving up.
    for attempt in range(attempts):
        try:
            return MilvusClient(uri=uri, token=token, timeout=settings.milvus.timeout_s)
        except Exception as exc:  # pymilvus raises several types for "cannot connect"
            if attempt == attempts - 1:
                raise EngineUnavailable(f"cannot reach Milvus at {uri} after {attempts} attempts: {exc}") from exc
            time.sleep(2.0 * (attempt + 1))
    raise AssertionError("unreachable")
