"""A second local Ray instance, started while a run of the session's Ray is in flight.

It is the machine state that made Ray Train kill live runs: ``/tmp/ray/ray_current_cluster``
names the newest Ray instance (``ray start`` writes it and leaves it behind when stopped), and
its dashboard sits on 127.0.0.1:8265, the state API that a cluster started without a dashboard
(the test session's) names for itself; a Ray process asked one or the other about its own
actors.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import requests
from ray._common.utils import get_ray_address_file
from ray.train.v2.api.callback import UserCallback

from tests.support.servers import agent_port_flags, free_port

BIN = Path(sys.executable).parent
DEFAULT_DASHBOARD = 8265
# Where Ray looks for it: /tmp/ray, or RAY_TMPDIR's ray folder (conftest, under pytest-xdist).
CURRENT_CLUSTER = Path(get_ray_address_file(None))


@contextlib.contextmanager
def another_ray_instance() -> Iterator[Callable[[], str]]:
    """Yield ``start()``: it starts a second Ray head (dashboard on) and returns its state API.

    From the moment this is entered, ``ray_current_cluster`` names that head's address, as a
    ``ray start`` on that port earlier on leaves it; the file is put back as it was afterwards,
    and the head is stopped by its PID.
    """
    import ray._private.services as services

    gcs, client, agent = (free_port() for _ in range(3))
    # Ray's default dashboard port: the state API a cluster without a dashboard names.
    dashboard = DEFAULT_DASHBOARD if port_is_free(DEFAULT_DASHBOARD) else free_port()
    saved = CURRENT_CLUSTER.read_text() if CURRENT_CLUSTER.exists() else None
    CURRENT_CLUSTER.parent.mkdir(parents=True, exist_ok=True)
    CURRENT_CLUSTER.write_text(f"{services.get_node_ip_address()}:{gcs}")
    temp_dir = tempfile.mkdtemp(prefix="ray2", dir="/tmp")  # short: Ray puts sockets in it
    heads: list[subprocess.Popen[bytes]] = []

    def start() -> str:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        heads.append(subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=1",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp_dir}",
             "--disable-usage-stats", *agent_port_flags()],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL))
        return f"http://127.0.0.1:{dashboard}"

    try:
        yield start
    finally:
        for head in heads:
            _stop(head)
        if saved is None:
            CURRENT_CLUSTER.unlink(missing_ok=True)
        else:
            CURRENT_CLUSTER.write_text(saved)
        shutil.rmtree(temp_dir, ignore_errors=True)


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def state_api_answers(url: str) -> bool:
    """Whether the head's state API lists actors (it does once the dashboard is up)."""
    try:
        return requests.get(f"{url}/api/v0/actors", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def _stop(head: subprocess.Popen[bytes]) -> None:
    head.terminate()
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=10)


class HoldAfterFirstReport(UserCallback):  # type: ignore[misc]
    """A Train run's callback (it runs in the run's controller): after the first report, the
    run waits until ``flag`` exists, then ``hold_s`` more, before it goes on.

    So a run on a fast machine cannot end before a second instance started mid-run answers;
    the cleaners poll once a second, and ``hold_s`` gives them several polls.
    """

    def __init__(self, flag: Path, hold_s: float, timeout_s: float = 180) -> None:
        self.flag, self.hold_s, self.timeout_s = flag, hold_s, timeout_s
        self.held = False

    def after_report(self, run_context: object, metrics: list[dict[str, object]],
                     checkpoint: object) -> None:
        if not self.held:
            self.held = True
            wait_until(self.flag.exists, self.timeout_s)
            time.sleep(self.hold_s)
