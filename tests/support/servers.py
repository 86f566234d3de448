"""Servers the tests start themselves on 127.0.0.1 and stop by their PID (MLflow tracking)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_mlflow_server(folder: Path, port: int, *extra_args: str,
                        env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A real MLflow tracking server on 127.0.0.1:port (sqlite backend), answering /health.

    ``extra_args`` go to ``mlflow server`` and ``env`` into its environment (the auth app).
    """
    # One worker and no job runner: the default spawns many processes (DESIGN facts).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts"), *extra_args],
        env=env, stdout=open(folder / "server.log", "a"), stderr=subprocess.STDOUT,
        start_new_session=True)
    deadline = time.monotonic() + 120
    while not _healthy(f"http://127.0.0.1:{port}"):
        if server.poll() is not None or time.monotonic() > deadline:
            stop_server(server)
            log = (folder / "server.log").read_text()[-2000:]
            raise RuntimeError(f"MLflow server did not start: {log}")
        time.sleep(0.5)
    return server


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def stop_server(server: subprocess.Popen[bytes]) -> None:
    """Stop a server started in its own session: its whole process group, by PID."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
