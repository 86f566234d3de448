"""One promotion decision at a time per registered model: a ticket lock in the MLflow registry.

Every search that can move a model's ``champion`` alias talks to the same registry, wherever it
runs (several Ray clusters, a laptop, a nightly job), so the lock lives there too: a Ray named
actor would only order the searches of one Ray cluster, and the registry is what it protects.

The lock of model ``NAME`` is the registered model ``NAME.lock``. A process that wants it
registers a version of that model: its *ticket*, tagged with its owner and the expiry of its
lease. MLflow numbers a model's versions itself, one past the highest, under a primary key on
(name, version), so two tickets never share a number, and a deleted version keeps its number
(MLflow's SQL stores delete versions softly), so a number is never given out twice. The holder
is the lowest live ticket: a process holds the lock once every lower ticket has been released
(deleted) or has let its lease run out. Waiting and holding processes renew their lease in the
background; one that died stops renewing, and the tickets behind it go on once its lease has
expired. Nobody takes a lock over, so there is no take-over to race (a create-if-absent mutex
needs one after a crash, and two waiters that both see the same dead holder can both take it).

What a lease cannot promise: a holder that stalls for longer than its lease (a frozen process,
a registry it cannot reach) may find that the next ticket went ahead. It then finds its own
ticket gone or expired (:meth:`Ticket.check`) before it moves an alias, and stops. Leases are
compared on each process's own clock: ``LEASE_S`` is far longer than any clock skew between
machines that share a registry should be.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

from flyp_ray.errors import FlypRayError

log = logging.getLogger(__name__)

T = TypeVar("T")

SUFFIX = ".lock"
OWNER_TAG = "flyp_ray.lock.owner"
EXPIRES_TAG = "flyp_ray.lock.expires"  # seconds since the epoch, on the owner's clock
PURPOSE_TAG = "flyp_ray.lock.purpose"
KIND_TAG = "flyp_ray.kind"
# A ticket is no model: its source names what it is (MLflow stores it as a string).
SOURCE = "flyp-ray:/promotion-lock"
LEASE_S = 300.0  # a holder renews every LEASE_S / 5; a dead one is passed LEASE_S after its last
POLL_S = 1.0  # how often a waiting process looks at the tickets ahead of it
WAIT_S = 6 * 3600.0  # a process gives up after waiting this long for the tickets ahead
RETRIES = 5  # a registry call that fails (a busy sqlite file, a server restarting) is retried


class LockLost(FlypRayError):
    """The ticket is gone or its lease ran out: another process may have gone ahead."""


@dataclasses.dataclass
class Ticket:
    """A held (or awaited) place in the lock of one registered model."""

    client: MlflowClient
    lock: str  # the lock's registered model, NAME.lock
    version: int
    owner: str
    lease_s: float
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    lost: str | None = None  # why the lease could not be renewed

    def renew(self) -> None:
        """Push the lease's expiry ``lease_s`` ahead; a ticket that is gone is lost."""
        try:
            _retry(lambda: self.client.set_model_version_tag(
                self.lock, str(self.version), EXPIRES_TAG, f"{time.time() + self.lease_s:.3f}"))
        except MlflowException as err:
            self.lost = f"its lease could not be renewed: {_first_line(err)}"

    def check(self) -> None:
        """Raise :class:`LockLost` unless this ticket still exists with a lease not run out.

        Called right before the holder acts: the last point where a stalled holder can tell.
        """
        try:
            version = _retry(lambda: self.client.get_model_version(self.lock, str(self.version)))
        except MlflowException as err:
            raise LockLost(f"{self.lock}: ticket {self.version} is gone "
                           f"({_first_line(err)})") from None
        if not _live(version, time.time()):
            raise LockLost(f"{self.lock}: the lease of ticket {self.version} ran out "
                           f"({self.lost or 'not renewed in time'})")


def owner_name() -> str:
    """``host:pid:random``: who holds a ticket, readable in the registry and unique."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def hold(client: MlflowClient, name: str, purpose: str, *, lease_s: float = LEASE_S,
         wait_s: float = WAIT_S, poll_s: float = POLL_S) -> Iterator[Ticket]:
    """Hold the lock of registered model ``name`` for the ``with`` block; released after it.

    Waits (polling every ``poll_s``) while a lower live ticket exists; raises
    :class:`FlypRayError` after ``wait_s``. ``purpose`` is written on the ticket for people
    who look at the registry while a decision runs.
    """
    lock = name + SUFFIX
    _ensure_lock_model(client, lock, name)
    ticket = _take_ticket(client, lock, purpose, lease_s)
    renewer = threading.Thread(target=_renew_until_stopped, args=(ticket,), daemon=True,
                               name=f"lease {lock} {ticket.version}")
    renewer.start()
    try:
        _wait_for_turn(ticket, name, wait_s, poll_s)
        yield ticket
    finally:
        ticket.stop.set()
        renewer.join(timeout=10)
        _release(ticket)


def _ensure_lock_model(client: MlflowClient, lock: str, name: str) -> None:
    try:
        _retry(lambda: client.create_registered_model(
            lock, tags={KIND_TAG: "promotion-lock"},
            description=f"flyp-ray's lock on the promotion decisions of {name}: each version is "
                        f"a process waiting for or making one (flyp_ray/tracking/lock.py)"))
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def _take_ticket(client: MlflowClient, lock: str, purpose: str, lease_s: float) -> Ticket:
    owner = owner_name()
    tags = {OWNER_TAG: owner, EXPIRES_TAG: f"{time.time() + lease_s:.3f}",
            PURPOSE_TAG: purpose[:500]}
    version = _retry(lambda: client.create_model_version(lock, SOURCE, tags=tags,
                                                         await_creation_for=0))
    return Ticket(client, lock, int(version.version), owner, lease_s)


def _renew_until_stopped(ticket: Ticket) -> None:
    while not ticket.stop.wait(ticket.lease_s / 5):
        ticket.renew()
        if ticket.lost:
            log.warning("%s: ticket %d: %s", ticket.lock, ticket.version, ticket.lost)


def _wait_for_turn(ticket: Ticket, name: str, wait_s: float, poll_s: float) -> None:
    deadline = time.monotonic() + wait_s
    announced: set[int] = set()
    while True:
        ahead = [v for v in _tickets(ticket) if int(v.version) < ticket.version]
        live = [v for v in ahead if _live(v, time.time())]
        _forget(ticket, [v for v in ahead if v not in live])
        if not live:
            return
        first = min(live, key=lambda v: int(v.version))
        if int(first.version) not in announced:
            announced.add(int(first.version))
            log.info("%s: waiting for the promotion decision of %s (%s)", name,
                     first.tags.get(OWNER_TAG, "?"), first.tags.get(PURPOSE_TAG, "?"))
        if time.monotonic() > deadline:
            raise FlypRayError(f"{name}: waited {wait_s:.0f} s for the promotion decision of "
                               f"{first.tags.get(OWNER_TAG, '?')} (ticket {first.version} of "
                               f"{ticket.lock}); it is alive, renewing its lease")
        time.sleep(poll_s)


def _tickets(ticket: Ticket) -> list[ModelVersion]:
    if "'" in ticket.lock:
        raise FlypRayError(f"{ticket.lock!r}: a registered model name with a quote cannot be "
                           f"looked up in an MLflow filter")
    where = f"name = '{ticket.lock}'"
    return list(_retry(lambda: ticket.client.search_model_versions(where)))


def _live(version: ModelVersion, now: float) -> bool:
    try:
        return float(version.tags.get(EXPIRES_TAG, "0")) > now
    except ValueError:
        return False


def _forget(ticket: Ticket, expired: list[ModelVersion]) -> None:
    """Delete tickets whose lease ran out: their owners died (or stalled, and will find out).

    Numbers are never given out again, so deleting one changes no one's place; it keeps the
    lock model free of dead tickets and tells a stalled owner at its next renewal.
    """
    for version in expired:
        log.warning("%s: ticket %s of %s ran out of lease (%s); passing it", ticket.lock,
                    version.version, version.tags.get(OWNER_TAG, "?"),
                    version.tags.get(PURPOSE_TAG, "?"))
        with contextlib.suppress(MlflowException):
            ticket.client.delete_model_version(ticket.lock, str(version.version))


def _release(ticket: Ticket) -> None:
    try:
        _retry(lambda: ticket.client.delete_model_version(ticket.lock, str(ticket.version)))
    except MlflowException as err:  # its lease runs out instead, LEASE_S from its last renewal
        log.warning("%s: could not release ticket %d (%s); it expires within %.0f s",
                    ticket.lock, ticket.version, _first_line(err), ticket.lease_s)


def _retry(call: Callable[[], T], retries: int = RETRIES) -> T:
    """``call()``, tried again with backoff when MLflow answers with a server-side error (a
    sqlite file busy past its timeout, a server restarting); a definite answer is raised."""
    for attempt in range(retries):
        try:
            return call()
        except MlflowException as err:
            if err.get_http_status_code() < 500 or attempt == retries - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def _first_line(err: MlflowException) -> str:
    lines = str(err.message).strip().splitlines()
    return lines[0][:200] if lines else str(err.error_code)
