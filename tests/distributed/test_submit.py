"""``flyp-ray submit`` against a real Ray head with the Jobs API and token authentication.

The head runs as a child process on free ports with its own temp dir, so it never touches another
Ray instance on this machine, and is stopped by its process group.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from flyp_ray.distributed import submit
from flyp_ray.errors import FlypRayError
from tests.support.configs import tiny_config, write_config
from tests.support.servers import agent_port_flags

BIN = Path(sys.executable).parent
FLYP_RAY = [sys.executable, "-m", "flyp_ray"]
HEAD_S = 300  # a Ray head's Jobs API answers in seconds when idle; this only stops a hang
JOB_S = 300  # the same for a command whose job runs on that head


@dataclass(frozen=True)
class Head:
    url: str
    token: str


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _head_env(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    # Explicit mode and token: a head started with the mode unset turns token auth on by itself
    # when ~/.ray/auth_token exists, which depends on what ran on this machine before.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")  # `python` in the job: this venv
    return env


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    """A Ray head with the dashboard (Jobs API) on 127.0.0.1, token auth on, 1 CPU."""
    token = secrets.token_hex(32)
    gcs, dashboard, client, agent = _free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray puts sockets in it
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=1",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp_dir}",
           "--disable-usage-stats", *agent_port_flags()]
    proc = subprocess.Popen(cmd, env=_head_env(token), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_jobs_api(url, token, proc)
        yield Head(url=url, token=token)
    finally:
        _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_jobs_api(url: str, token: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + HEAD_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}")
        try:
            r = requests.get(f"{url}/api/jobs/", timeout=2,
                             headers={"Authorization": f"Bearer {token}"})
            if r.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"the Jobs API at {url} did not answer within {HEAD_S} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop our head: SIGTERM to `ray start --block` (it drains and stops its node), then
    SIGKILL to whatever of its process group is left. Only our processes are touched."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _client_env(token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN",
                        "RAY_AUTH_TOKEN_PATH")}
    # Ray's own client would send ~/.ray/auth_token under RAY_AUTH_MODE=token; with the mode
    # off, only the header that flyp-ray sends from RAY_AUTH_TOKEN can authenticate.
    env["RAY_AUTH_MODE"] = "disabled"
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return env


def _flyp_ray(*args: str, token: str | None, cwd: Path,
              timeout: float = JOB_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLYP_RAY, *args], env=_client_env(token), cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, check=False)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A working dir with a good and a bad config, plus things that must not be uploaded."""
    wd = tmp_path / "project"
    wd.mkdir()
    write_config(wd / "good.yaml", tiny_config(wd, storage="results"))
    write_config(wd / "bad.yaml", tiny_config(wd, train={"lrr": 0.1}))
    return wd


@pytest.mark.slow
def test_wait_streams_logs_and_exits_0(head: Head, project: Path, tmp_path: Path) -> None:
    # Run from another folder, with the config given by its absolute path: it must arrive.
    done = _flyp_ray("submit", "--address", head.url, "--wait", "--working-dir", str(project),
                     "--", "validate", str(project / "good.yaml"), token=head.token, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "good.yaml: config ok" in done.stdout  # streamed from the job
    assert "model flyp-tiny with random initialisation" in done.stdout
    assert "SUCCEEDED" in done.stderr


@pytest.mark.slow
def test_no_wait_prints_job_id_and_remote_bad_input_fails_with_2(head: Head,
                                                                 project: Path) -> None:
    from ray.job_submission import JobSubmissionClient

    done = _flyp_ray("submit", "--address", head.url, "--", "validate", "bad.yaml",
                     token=head.token, cwd=project)
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["address"] == head.url
    client = JobSubmissionClient(head.url, headers={"Authorization": f"Bearer {head.token}"})
    assert client.get_job_info(line["job_id"]).entrypoint == "python -m flyp_ray validate bad.yaml"
    # What `submit --wait` runs after submitting: the remote exit code 2 comes back as 2.
    logs = io.StringIO()
    assert submit.wait(client, line["job_id"], out=logs) == 2
    assert "bad.yaml: train.lrr: unknown key" in logs.getvalue()
    assert client.get_job_info(line["job_id"]).driver_exit_code == 2

    # Where the log websocket is refused (some proxies), wait() polls the logs instead.
    async def refused(job_id: str) -> AsyncIterator[str]:
        raise RuntimeError("websocket refused")
        yield ""  # an async generator, like Ray's

    client.tail_job_logs = refused  # type: ignore[method-assign]
    polled = io.StringIO()
    assert submit.wait(client, line["job_id"], out=polled, poll_s=0.2) == 2
    assert polled.getvalue() == logs.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("token", [None, "not-the-token"])
def test_missing_or_wrong_token_is_bad_input(head: Head, project: Path, token: str | None) -> None:
    done = _flyp_ray("submit", "--address", head.url, "--", "validate", "good.yaml",
                     token=token, cwd=project, timeout=60)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert head.url in line and "authentication failed" in line and "RAY_AUTH_TOKEN" in line


def test_unreachable_address_is_bad_input(tmp_path: Path) -> None:
    (port,) = _free_ports(1)  # nothing listens there
    done = _flyp_ray("submit", "--address", f"127.0.0.1:{port}", "--", "validate", "x.yaml",
                     token=None, cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert f"http://127.0.0.1:{port}" in line and "Traceback" not in done.stderr


def test_upload_leaves_out_results_envs_and_stores(project: Path) -> None:
    """The runtime_env's excludes, applied by Ray's own packaging code."""
    from ray._private.runtime_env.packaging import create_package

    for junk in (".venv/lib/x.py", ".git/HEAD", "results/trial/ckpt.pt", "flyp_ray_results/a",
                 "mlruns/0/meta.yaml", "pkg/__pycache__/m.pyc", "sub/results/keep.txt"):
        (project / junk).parent.mkdir(parents=True, exist_ok=True)
        (project / junk).write_text("x")
    (project / "mlflow.db").write_text("x")
    env = submit.runtime_env(["validate", str(project / "good.yaml")], project)
    zip_path = project.parent / "pkg.zip"
    create_package(env["working_dir"], zip_path, include_gitignore=True,
                   excludes=env["excludes"])
    files = {n for n in zipfile.ZipFile(zip_path).namelist() if not n.endswith("/")}
    assert files == {"good.yaml", "bad.yaml", "sub/results/keep.txt"}, files


def test_job_arguments_are_relative_to_the_working_dir(project: Path, tmp_path: Path) -> None:
    cmd = ["tune", str(project / "good.yaml"), "--set", "lr=1e-4", "--set",
           "dataset.root=/data/wilds", "/cluster/only.yaml"]
    assert submit.job_arguments(cmd, project) == [
        "tune", "good.yaml", "--set", "lr=1e-4", "--set", "dataset.root=/data/wilds",
        "/cluster/only.yaml"]
    assert submit.entrypoint(["tune", "a b.yaml", "--set", "train.templates=['x {}']"]) == (
        "python -m flyp_ray tune 'a b.yaml' --set 'train.templates=['\"'\"'x {}'\"'\"']'")


def test_token_headers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert submit.auth_headers() == {}
    (tmp_path / "tok").write_text("abc\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert submit.auth_headers() == {"Authorization": "Bearer abc"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "def")  # Ray's precedence: the variable first
    assert submit.auth_headers() == {"Authorization": "Bearer def"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(submit.BadInput, match="RAY_AUTH_TOKEN_PATH"):
        submit.auth_headers()


def test_a_verbose_submit_makes_the_job_verbose(project: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLYP_RAY_VERBOSE", raising=False)
    assert "env_vars" not in submit.runtime_env(["tune", "good.yaml"], project)
    monkeypatch.setenv("FLYP_RAY_VERBOSE", "1")  # what --verbose sets, or the user did
    env = submit.runtime_env(["tune", "good.yaml"], project)
    assert env["env_vars"] == {"FLYP_RAY_VERBOSE": "1"}


class BusyHead:
    """Stands in for a JobSubmissionClient whose head answers "no agent" ``busy`` times (Ray's
    text, as `JobSubmissionClient` raises it for the head's HTTP 500), then takes the job."""

    def __init__(self, busy: int) -> None:
        self.busy, self.calls = busy, 0

    def get_address(self) -> str:
        return "http://127.0.0.1:8265"

    def submit_job(self, **_: object) -> str:
        self.calls += 1
        if self.calls <= self.busy:
            raise RuntimeError("Request failed with status code 500: No available agent to "
                               "submit job, please try again later..")
        return "raysubmit_1"


class GoneHead(BusyHead):
    """A head whose process ended while it was taking the job: the connection drops."""

    def submit_job(self, **_: object) -> str:
        raise requests.ConnectionError("('Connection aborted.', RemoteDisconnected('Remote end "
                                       "closed connection without response'))")


def test_a_head_without_its_job_agent_yet_is_asked_again(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Seen in CI: a head started moments before, on a loaded machine, refused the first job.
    monkeypatch.setattr(submit, "AGENT_RETRY_S", 0.01)
    head = BusyHead(busy=2)
    assert submit.submit(head, ["validate", "good.yaml"], project) == "raysubmit_1"  # type: ignore[arg-type]
    assert head.calls == 3
    with pytest.raises(FlypRayError, match=r"--address http://127.0.0.1:8265: the "
                       r"cluster's job agent did not answer within 0 s"):
        submit.submit(BusyHead(busy=10**6), ["validate", "good.yaml"], project,  # type: ignore[arg-type]
                      agent_wait_s=0.05)


def test_a_head_that_drops_the_connection_is_one_line_naming_it(project: Path) -> None:
    # Seen in CI: the head's raylet exited while submit waited for its job agent; the
    # requests error went up as a traceback.
    with pytest.raises(FlypRayError) as caught:
        submit.submit(GoneHead(busy=0), ["validate", "good.yaml"], project)  # type: ignore[arg-type]
    (line,) = str(caught.value).splitlines()
    assert line.startswith("--address http://127.0.0.1:8265: the head dropped the connection")
    assert "Connection aborted" in line and "ray job list" in line
    assert not isinstance(caught.value, submit.BadInput)  # not the user's input: exit 1
