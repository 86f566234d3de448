"""Servers the tests start themselves on 127.0.0.1 and stop by their PID: MLflow tracking,
``mlflow models serve`` and ``flyp-ray serve``."""

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


def agent_port_flags() -> list[str]:
    """``ray start`` flags that fix the ports of a head's agents to free ones.

    Left to choose, each agent writes the port it took into the session folder, and the raylet
    waits for those files for a fixed time, then exits, taking the head with it (Ray issue
    65983). On a 2-core machine busy with a test search, the dashboard agent's imports can take
    longer: a CI run lost its Jobs API head that way, mid-test. Given the ports, the raylet has
    nothing to wait for, and a slow agent only answers later.
    """
    grpc, export, runtime_env = (free_port() for _ in range(3))
    return [f"--dashboard-agent-grpc-port={grpc}", f"--metrics-export-port={export}",
            f"--runtime-env-agent-port={runtime_env}"]


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
    # About 25 s here when idle: the limit only stops a server that will never answer.
    wait_until_healthy(server, f"http://127.0.0.1:{port}/health", folder / "server.log", 300)
    return server


def launch_model_server(command: list[str], log: Path,
                        env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a model server (``mlflow models serve``, ``flyp-ray serve``); returns at once, so
    that several can start side by side (then :func:`wait_until_healthy` on ``/ping``).

    Its own session, so that its whole process group can be stopped; the virtual
    environment's bin/ on PATH (``mlflow models serve`` runs ``uvicorn`` from there).
    """
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, **env}
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own
    return subprocess.Popen(command, env=env, stdout=open(log, "a"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_healthy(server: subprocess.Popen[bytes], url: str, log: Path,
                       timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; stop the server and raise with its log if it dies
    or takes longer than ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not _healthy(url):
        if server.poll() is not None or time.monotonic() > deadline:
            stop_server(server)
            raise RuntimeError(f"{url} did not answer: {log.read_text()[-3000:]}")
        time.sleep(0.5)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
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


def stop_gracefully(server: subprocess.Popen[bytes], timeout_s: float = 180) -> int | None:
    """SIGTERM to the server's own PID only, so that it can take down what it started (Ray);
    then its process group, by PID, for anything left. Its exit code, None if it hung."""
    try:
        server.send_signal(signal.SIGTERM)
        code: int | None = server.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        code = None
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait()
    return code
