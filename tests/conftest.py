"""Shared fixtures: one local Ray instance for the whole session, the tiny model, configs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

# Quiet, small Ray for a 2-core machine; set before ray is imported anywhere.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from flyp_ray.cli import RAY_ENV  # noqa: E402
from flyp_ray.model import tiny_config_path  # noqa: E402


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray cluster shared by every test that needs Ray; shut down at the end."""
    import ray

    # Workers import test modules by name (functions defined in tests run there too).
    tests = str(Path(__file__).parent)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=True,
             runtime_env={"env_vars": {"PYTHONPATH": tests, **RAY_ENV}})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_arch() -> str:
    """The path of the tiny open_clip model-config JSON shipped with the package."""
    return str(tiny_config_path())


@pytest.fixture(scope="session")
def tiny_vit_arch() -> str:
    """The tiny ViT config: no BatchNorm, so data parallel is exactly one big batch."""
    return str(tiny_config_path(vit=True))


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    """Write a config mapping as YAML and return its path."""
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def tiny_config(tmp: Path, **sections: Any) -> dict[str, Any]:
    """A small, fast config: synthetic data, the tiny model, one CPU worker, local sqlite."""
    raw: dict[str, Any] = {
        "dataset": {"name": "synthetic", "subsample": 64},
        "model": {"arch": str(tiny_config_path()), "pretrained": None},
        "train": {"epochs": 1, "batch_size": 16, "lr": 1.0e-3, "warmup_steps": 2,
                  "eval_batch_size": 64},
        "resources": {"workers": 1, "cpus_per_worker": 0.5, "max_failures": 0},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "test"},
        "storage": str(tmp / "results"),
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values} if isinstance(values, dict) else values
    return raw


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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server for the session, stopped by its PID at the end."""
    port = free_port()
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    yield f"http://127.0.0.1:{port}"
    stop_server(server)
