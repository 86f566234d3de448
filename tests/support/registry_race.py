"""What each process of the registry races runs (tests/tracking/test_lock.py): module-level
functions, so that ``multiprocessing``'s spawned processes can import them."""

from __future__ import annotations

import time
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flyp_ray.tracking import lock

COUNT_TAG = "count"


def create_both(uri: str, model: str, numbered: str, barrier: Any) -> tuple[str, int]:
    """At the same moment as the others: create registered model ``model`` ("created", or the
    error code MLflow answered); then a version of ``numbered`` (its number)."""
    client = MlflowClient(tracking_uri=uri)
    barrier.wait()
    try:
        client.create_registered_model(model)
        outcome = "created"
    except MlflowException as err:
        outcome = str(err.error_code)
    barrier.wait()
    version = client.create_model_version(numbered, lock.SOURCE, await_creation_for=0)
    return outcome, int(version.version)


def count_under_lock(uri: str, name: str, counter: str, barrier: Any) -> tuple[float, float]:
    """Hold the lock of ``name``; inside, read the counter tag, wait, write it plus one: a lost
    update if two processes were ever inside together. Returns (entered, left) times."""
    client = MlflowClient(tracking_uri=uri)
    barrier.wait()
    with lock.hold(client, name, "a test's critical section", poll_s=0.1):
        entered = time.time()
        count = int(client.get_registered_model(counter).tags[COUNT_TAG])
        time.sleep(0.3)
        client.set_registered_model_tag(counter, COUNT_TAG, str(count + 1))
        left = time.time()
    return entered, left
