"""Run any ``flyp-ray`` command on a Ray cluster as a Ray job, through the Ray Jobs API.

``flyp-ray submit --address URL [--wait] -- tune search_spaces/iwildcam.yaml`` uploads the working
directory (so the config files, and the package source when run from the repository, travel with
the job), runs ``python -m flyp_ray tune ...`` on the cluster, and with ``--wait`` streams the
job's logs and exits with the job's outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

from flyp_ray.distributed import verbosity
from flyp_ray.errors import BadInput, FlypRayError

log = logging.getLogger(__name__)

# Never worth uploading: version control, environments, local results and tracking stores.
# Patterns are gitignore-style, matched against paths relative to the working directory.
ALWAYS_EXCLUDED = (".git", ".venv", "venv", "__pycache__", "*.pyc", "mlruns", "mlartifacts",
                   "*.db", "flyp_ray_results", ".pytest_cache", "*.egg-info")

_TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
# Ray's job head, when no job agent answers it in time; its own advice is to try again later.
NO_AGENT = "No available agent to submit job"
AGENT_WAIT_S = 120.0
AGENT_RETRY_S = 2.0


def auth_headers() -> dict[str, str]:
    """``Authorization: Bearer`` from ``RAY_AUTH_TOKEN`` or the file in ``RAY_AUTH_TOKEN_PATH``.

    Ray's own client adds this header only when ``RAY_AUTH_MODE=token`` is set on the laptop
    too; sending the token whenever one is given makes ``RAY_AUTH_TOKEN`` alone enough. Without
    either variable nothing is added here and Ray's own logic applies (``RAY_AUTH_MODE=token``
    with ``~/.ray/auth_token``).
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if not token and path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as err:
            raise BadInput(f"RAY_AUTH_TOKEN_PATH: cannot read token file {path} "
                           f"({err.strerror})") from None
        if not token:
            raise BadInput(f"RAY_AUTH_TOKEN_PATH: token file {path} is empty")
    return {"Authorization": f"Bearer {token}"} if token else {}


def normalise_address(address: str) -> str:
    """The dashboard URL: a bare ``host:port`` means ``http://host:port``."""
    address = address.strip().rstrip("/")
    # Without a scheme Ray would read the address as a GCS address and look the dashboard up
    # through it; the Jobs API is plain HTTP on the dashboard port, so say so.
    return address if "://" in address else f"http://{address}"


@contextlib.contextmanager
def _explicit_address() -> Iterator[None]:
    """Hide RAY_ADDRESS / RAY_API_SERVER_ADDRESS while the client resolves its address.

    JobSubmissionClient prefers those variables over its ``address`` argument; here the address
    on the command line is the one the user meant.
    """
    names = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str) -> JobSubmissionClient:
    """A Jobs API client for the cluster at ``address``; BadInput when it cannot be reached."""
    url = normalise_address(address)
    try:
        with _explicit_address():
            return JobSubmissionClient(url, headers=auth_headers())
    except AuthenticationError as err:
        raise BadInput(f"--address {url}: {_auth_problem(err)}") from None
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise BadInput(f"--address {url}: cannot reach the Ray Jobs API ({_first_line(err)})"
                       ) from None


def _auth_problem(err: AuthenticationError) -> str:
    hint = ("set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token"
            if not auth_headers() else "the token in RAY_AUTH_TOKEN is not the cluster's")
    return f"authentication failed ({_first_line(err)}); {hint}"


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def entrypoint(command: Sequence[str]) -> str:
    """The job's shell command: ``python -m flyp_ray <command>``, each argument quoted."""
    return shlex.join(["python", "-m", "flyp_ray", *command])


def job_arguments(command: Sequence[str], working_dir: Path) -> list[str]:
    """``command`` with local files inside ``working_dir`` made relative to it.

    The job runs in the uploaded copy of ``working_dir``, so ``/home/me/proj/x.yaml`` or
    ``proj/x.yaml`` must become ``x.yaml`` there. Other arguments (flags, values, paths that
    exist only on the cluster) pass unchanged.
    """
    root = working_dir.resolve()
    out = []
    for arg in command:
        path = Path(arg).expanduser()
        if not arg.startswith("-") and _is_file(path) and path.resolve().is_relative_to(root):
            arg = path.resolve().relative_to(root).as_posix()
        out.append(arg)
    return out


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. an argument too long to be a file name
        return False


def excludes(command: Sequence[str]) -> list[str]:
    """Upload excludes: :data:`ALWAYS_EXCLUDED` plus relative ``storage`` folders of the configs.

    ``command`` is as typed here (paths relative to this directory). A relative ``storage`` puts
    results inside the job's working directory, so a second submission would upload the first
    one's results. The configs are read loosely: a broken config is reported by the command on the
    cluster, with its own exit code.
    """
    found = []
    for value in _storage_values(command):
        if "://" in value or value.startswith(("/", "~")):
            continue
        relative = Path(os.path.normpath(value)).as_posix()
        if relative not in (".", "") and not relative.startswith(".."):
            found.append(f"/{relative}")  # anchored: only that folder, at the top
    return [*ALWAYS_EXCLUDED, *dict.fromkeys(found)]


def _storage_values(command: Sequence[str]) -> Iterator[str]:
    from flyp_ray.config import parse_yaml
    from flyp_ray.errors import FlypRayError

    for i, arg in enumerate(command):
        if arg.startswith("storage=") and i > 0 and command[i - 1] == "--set":
            yield arg.partition("=")[2].strip()
        elif arg.startswith("--set=storage="):
            yield arg.partition("storage=")[2].strip()
        elif arg.endswith((".yaml", ".yml")) and _is_file(Path(arg)):
            try:
                raw = parse_yaml(Path(arg).read_text(), arg)
            except (FlypRayError, OSError, UnicodeDecodeError):
                continue
            if isinstance(raw, dict) and isinstance(raw.get("storage"), str):
                yield raw["storage"]


def runtime_env(command: Sequence[str], working_dir: Path) -> dict[str, Any]:
    """The job's runtime_env: the working directory to upload and what to leave out of it,
    and ``FLYP_RAY_VERBOSE=1`` when this command runs verbose (the job then does too).

    ``command`` is as typed here, before :func:`job_arguments` rewrites its paths.
    """
    if not working_dir.is_dir():
        raise BadInput(f"--working-dir: not a folder: {working_dir}")
    env: dict[str, Any] = {"working_dir": str(working_dir.resolve()),
                           "excludes": excludes(command)}
    if verbosity.enabled():
        env["env_vars"] = {verbosity.ENV: "1"}
    return env


def submit(client: JobSubmissionClient, command: Sequence[str], working_dir: Path,
           agent_wait_s: float = AGENT_WAIT_S) -> str:
    """Submit ``python -m flyp_ray <command>`` with ``working_dir`` uploaded; returns the job id.

    A head whose job agent is not up yet (a cluster just started, or a busy head) answers
    that it has none and to try again later: this waits up to ``agent_wait_s`` for it.
    """
    env = runtime_env(command, working_dir)
    args = job_arguments(command, working_dir)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint(args), runtime_env=env)
        except AuthenticationError as err:
            raise BadInput(f"--address {client.get_address()}: {_auth_problem(err)}") from None
        except requests.ConnectionError as err:
            # The head went away mid-request (seen when a just-started head's raylet exited):
            # whether it created the job before it did is not known from here.
            raise FlypRayError(f"--address {client.get_address()}: the head dropped the "
                               f"connection while taking the job ({_first_line(err)}); check "
                               f"the cluster (`ray job list --address "
                               f"{client.get_address()}`) and submit again") from None
        except RuntimeError as err:
            if NO_AGENT not in str(err):
                raise
            if time.monotonic() > deadline:
                raise FlypRayError(f"--address {client.get_address()}: the cluster's job agent "
                                   f"did not answer within {agent_wait_s:.0f} s ({NO_AGENT})"
                                   ) from None
            log.info("the cluster's job agent is not ready yet; trying again")
            time.sleep(AGENT_RETRY_S)


def wait(client: JobSubmissionClient, job_id: str, out: TextIO = sys.stdout,
         poll_s: float = 1.0) -> int:
    """Stream the job's logs to ``out`` until it ends; its exit code for this command.

    0 when the job SUCCEEDED; 2 when the command on the cluster exited 2 (bad input, already
    explained in the logs); 1 for any other failure or a stopped job.
    """
    try:
        asyncio.run(_tail(client, job_id, out))
    except (RuntimeError, OSError, aiohttp.ClientError) as err:
        # The log websocket can drop or be refused (proxies, port-forwards); polling still works.
        log.warning("log stream of %s broke (%s); polling instead", job_id, _first_line(err))
        _poll_logs(client, job_id, out, poll_s)
    info = client.get_job_info(job_id)
    while info.status not in _TERMINAL:
        time.sleep(poll_s)
        info = client.get_job_info(job_id)
    code = _exit_code(info.status, info.driver_exit_code)
    detail = f" (exit code {info.driver_exit_code})" if info.driver_exit_code is not None else ""
    print(f"flyp-ray: job {job_id} {info.status.value}{detail}", file=sys.stderr)
    return code


def _exit_code(status: JobStatus, driver_exit_code: int | None) -> int:
    if status == JobStatus.SUCCEEDED:
        return 0
    return 2 if driver_exit_code == 2 else 1


async def _tail(client: JobSubmissionClient, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def _poll_logs(client: JobSubmissionClient, job_id: str, out: TextIO, poll_s: float) -> None:
    shown = 0
    while True:
        done = client.get_job_status(job_id) in _TERMINAL
        logs = client.get_job_logs(job_id)
        out.write(logs[shown:])
        out.flush()
        shown = len(logs)
        if done:
            return
        time.sleep(poll_s)


def start(address: str, command: Sequence[str], *,
          working_dir: Path | None = None) -> tuple[JobSubmissionClient, str]:
    """Submit ``command`` as a job of the cluster at ``address``; the client and the job id."""
    if not command:
        raise BadInput("submit: no command after '--' (e.g. -- tune search_spaces/iwildcam.yaml)")
    folder = working_dir or Path.cwd()
    if not folder.is_dir():
        raise BadInput(f"--working-dir: not a folder: {folder}")
    client = connect(address)
    job_id = submit(client, command, folder)
    print(f"flyp-ray: submitted job {job_id} to {client.get_address()}", file=sys.stderr)
    return client, job_id


def follow(client: JobSubmissionClient, job_id: str) -> int:
    """``submit --wait``: stream the job's logs; its exit code. Ctrl-C leaves the job running."""
    try:
        return wait(client, job_id)
    except KeyboardInterrupt:
        print(f"flyp-ray: job {job_id} keeps running on the cluster; stop it with "
              f"`ray job stop --address {client.get_address()} {job_id}`", file=sys.stderr)
        raise
