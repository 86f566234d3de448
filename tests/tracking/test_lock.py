"""The promotion lock (flyp_ray/tracking/lock.py) on real MLflow stores: a sqlite file and a
real ``mlflow server``, raced by several processes at once.

First the registry's own promises the lock stands on: of processes that create one registered
model at the same moment exactly one succeeds, and processes that create versions of one model
get distinct numbers. Then the lock itself: processes that increment a counter under it lose no
update, and their critical sections never overlap; a dead holder's ticket is passed once its
lease runs out; a holder whose lease ran out finds out before it acts.
"""

from __future__ import annotations

import multiprocessing
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flyp_ray.tracking import lock
from tests.support import registry_race

PROCESSES = 4


@pytest.fixture(params=["sqlite", "server"])
def registry_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "server":
        uri: str = request.getfixturevalue("mlflow_server")
        return uri
    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    # The processes race on the registry, not on creating the database's tables.
    MlflowClient(tracking_uri=uri).search_registered_models()
    return uri


@pytest.fixture(scope="module")
def pool() -> Iterator[tuple[multiprocessing.pool.Pool, multiprocessing.managers.SyncManager]]:
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(PROCESSES) as processes:
        yield processes, manager


def unique(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def test_registry_creates_a_name_once_and_numbers_versions_once(registry_uri: str,
                                                                pool: tuple) -> None:
    processes, manager = pool
    model, numbered = unique("race"), unique("numbered")
    MlflowClient(tracking_uri=registry_uri).create_registered_model(numbered)
    barrier = manager.Barrier(PROCESSES)

    results = processes.starmap(registry_race.create_both,
                                [(registry_uri, model, numbered, barrier)] * PROCESSES)

    outcomes = sorted(outcome for outcome, _ in results)
    assert outcomes == ["RESOURCE_ALREADY_EXISTS"] * (PROCESSES - 1) + ["created"]
    assert sorted(number for _, number in results) == list(range(1, PROCESSES + 1))


def test_lock_lets_one_process_in_at_a_time(registry_uri: str, pool: tuple) -> None:
    processes, manager = pool
    name, counter = unique("locked"), unique("counter")
    client = MlflowClient(tracking_uri=registry_uri)
    client.create_registered_model(counter, tags={registry_race.COUNT_TAG: "0"})
    barrier = manager.Barrier(PROCESSES)

    spans = processes.starmap(registry_race.count_under_lock,
                              [(registry_uri, name, counter, barrier)] * PROCESSES)

    assert client.get_registered_model(counter).tags[registry_race.COUNT_TAG] == str(PROCESSES)
    spans.sort()
    for (_, left), (entered, _) in zip(spans, spans[1:], strict=False):
        assert left <= entered, spans
    # Every ticket released: nothing is left waiting or held.
    assert client.search_model_versions(f"name = '{name}{lock.SUFFIX}'") == []


def test_a_dead_holders_ticket_is_passed_once_its_lease_runs_out(tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'registry.db'}")
    name = "abandoned"
    client.create_registered_model(name + lock.SUFFIX)
    # What a process that died holding the lock leaves: a ticket nobody renews.
    expires = time.time() + 2.0
    dead = client.create_model_version(
        name + lock.SUFFIX, lock.SOURCE, await_creation_for=0,
        tags={lock.OWNER_TAG: "gone:1:dead", lock.EXPIRES_TAG: f"{expires:.3f}"})

    with lock.hold(client, name, "after a crash", poll_s=0.1) as ticket:
        assert time.time() >= expires
        assert ticket.version == int(dead.version) + 1
        live = client.search_model_versions(f"name = '{name}{lock.SUFFIX}'")
        assert [int(v.version) for v in live] == [ticket.version]  # the dead ticket deleted
        ticket.check()  # held, with a lease that runs


def test_a_holder_whose_lease_ran_out_finds_out_before_it_acts(tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'registry.db'}")
    with lock.hold(client, "stalled", "a stall", lease_s=60) as ticket:
        # As if it stalled past its lease: the next ticket may have gone ahead meanwhile.
        client.set_model_version_tag(ticket.lock, str(ticket.version), lock.EXPIRES_TAG, "0")
        with pytest.raises(lock.LockLost, match="lease of ticket 1 ran out"):
            ticket.check()
        client.delete_model_version(ticket.lock, str(ticket.version))
        with pytest.raises(lock.LockLost, match="ticket 1 is gone"):
            ticket.check()
