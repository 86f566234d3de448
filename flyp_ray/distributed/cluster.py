"""Joining or starting the Ray cluster a command runs on, and what it can hold.

Ray is imported inside the functions: ``flyp-ray validate`` and a bad config fail fast without
paying for it.
"""

from __future__ import annotations

import os
import socket

from flyp_ray.config import Config
from flyp_ray.distributed import capacity, verbosity
from flyp_ray.errors import BadInput

RAY_ENV = {
    # Ray Train gives a worker group 60 s to start; on a busy or small machine, starting a
    # worker process that imports torch can take longer, and the trial would fail for no reason.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
    # The Train controller polls its workers every 2 s by default, and only then sees a report
    # or the end of training: each run and each epoch's report waited 1 s on average for it.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
# A cluster on this machine (one that ray.init starts, or a `ray start` head found here) is
# not drained for preemption: Ray Train's preemption watcher, one more actor process per run
# that only reports drains, has nothing to watch there.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# Ray starts its worker processes at nice 15, so that they cannot starve its raylet. On a cluster
# a command starts for itself, the Train worker *is* the work, and at nice 15 every wake-up of
# a Ray daemon, the command's own process or MLflow preempts one of its compute threads, while
# the other waits for it at the next OpenMP barrier. Read by the raylet this command starts;
# a cluster joined (`ray start`, RAY_ADDRESS) keeps its own setting, and so does a user's value.
WORKER_NICENESS = ("RAY_worker_niceness", "0")
_STARTED_RAY: list[bool] = []  # not empty once this process's command has connected Ray


def init_ray(cfg: Config | None = None, address: str | None = None) -> None:
    """Join the cluster at ``address`` or in RAY_ADDRESS (or the one this job runs in), else
    start a local one.

    With ``cfg``, a run whose workers could never be placed is refused here, rather than
    waiting for resources that the cluster does not have.
    """
    import ray

    if not ray.is_initialized():
        verbosity.quiet_libraries()  # before ray.init, whose notices it silences
        address = address or os.environ.get("RAY_ADDRESS")
        check_reachable(address)
        if address in (None, "local"):
            os.environ.setdefault(*WORKER_NICENESS)
        try:
            ray.init(address=address, log_to_driver=True, configure_logging=False,
                     runtime_env=runtime_env(local=address in (None, "local")))
            _STARTED_RAY.append(True)
        except (ConnectionError, TimeoutError) as err:
            raise BadInput(f"RAY_ADDRESS: cannot reach a Ray cluster at {address!r} "
                           f"({type(err).__name__})") from None
    if cfg is not None:
        check_connected(cfg)


def check_address() -> str | None:
    """The ``RAY_ADDRESS`` a command will join, refused if it takes no connection; None when
    there is none to check (no address, ``auto``, ``local``).

    The commands call it first, before the preflight, whose imports take about ten seconds on
    a small machine: a mistyped address is refused in a second, and ``validate`` catches it.
    """
    address = os.environ.get("RAY_ADDRESS")
    return address if check_reachable(address) else None


def check_reachable(address: str | None, timeout_s: float = 5.0) -> bool:
    """Refuse a ``RAY_ADDRESS`` whose host and port take no connection, in seconds.

    ``ray.init`` would retry for about two minutes before saying the same. ``auto``, ``local``
    and no address are left to Ray (False: nothing was checked).
    """
    if not address or address in ("auto", "local"):
        return False
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise BadInput(f"RAY_ADDRESS: expected host:port or ray://host:port, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise BadInput(f"RAY_ADDRESS: cannot reach a Ray cluster at {address!r} "
                       f"({err.strerror or type(err).__name__})") from None
    return True


def check_connected(cfg: Config) -> None:
    """Refuse a worker group the connected cluster cannot hold, nor its autoscaler add."""
    capacity.judge(cfg, capacity.connected())  # its warnings were given before Ray started


def shutdown_if_started() -> None:
    """Disconnect from Ray if this process's command connected it (stops a local cluster)."""
    if _STARTED_RAY:
        import ray

        ray.shutdown()
        _STARTED_RAY.clear()


def runtime_env(env_vars: dict[str, str] | None = None, *,
                local: bool = False) -> dict[str, object]:
    """The runtime environment of a command's Ray job: its variables (Ray's, and what the
    command prints: :func:`verbosity.env`) and :func:`own_cluster`.

    ``local``: for a cluster started on this machine by this process (:data:`LOCAL_RAY_ENV`).
    """
    return {"env_vars": {**RAY_ENV, **(LOCAL_RAY_ENV if local else {}), **verbosity.env(),
                         **(env_vars or {})},
            "worker_process_setup_hook": f"{__name__}.{job_process.__name__}"}


def job_process() -> None:
    """Run in every Ray worker process of the job, before its first task or actor."""
    own_cluster()
    verbosity.quiet_ray_notices()


def own_cluster() -> None:
    """Run in every Ray worker process of the job: point Ray's own lookups at this cluster.

    Ray Train's ``PlacementGroupCleaner`` asks the state API whether its run's controller is
    alive, and an actor the state API does not know counts as dead: it then removes the run's
    workers. Left to itself, that lookup can reach another Ray instance on the machine: without
    an address it takes the newest instance (``ray start`` writes it to
    /tmp/ray/ray_current_cluster), and a cluster started without a dashboard still names
    127.0.0.1:8265 as its state API, where another instance's dashboard may answer. So each
    process gets its own cluster's address, and its own dashboard as the state API; with no
    dashboard, an address that answers nothing, so the cleaner waits (as Ray does while the
    state API is down) rather than ask a stranger. flyp-ray's own runs now start no cleaner
    (:class:`flyp_ray.distributed.trainer.Trainer`); the hook stays for every other lookup a
    Ray process of the job makes without an address.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    dashboard = dashboard_address()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{dashboard}" if dashboard else NO_STATE_API


def dashboard_address() -> str:
    """The connected cluster's dashboard (host:port), which serves Ray's state API; "" without
    one."""
    from ray._private.services import get_webui_url_from_internal_kv

    return str(get_webui_url_from_internal_kv() or "")


# Port 9 (discard) takes no connection here: a state API lookup fails at once.
NO_STATE_API = "http://127.0.0.1:9"
