"""Worker groups left reserved by a Train run that was killed: found and freed.

Ray scopes a placement group to its *job*, not to the actor that created it. A scheduler stops a
trial by killing its process; the trial's Ray Train controllers die with it, and so do their
workers, but the controllers' placement groups stay reserved until the whole job ends, so later
trials wait for resources nobody uses. Ray Train's own ``PlacementGroupCleaner`` frees them, but
only by asking the state API, which a cluster without a dashboard does not serve.

The GCS itself records that a group's creator has died, so this reads it there. Only groups of
this job whose creator was an actor are touched: a group a driver created (Tune's trials, a
user's own) or a detached one is never an orphan.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group

log = logging.getLogger(__name__)

_UNREADABLE: list[bool] = []  # not empty once this process has warned that the GCS is unread


def orphaned() -> list[str]:
    """The ids (hex) of this job's held placement groups whose creating actor has died."""
    return [group.placement_group_id.hex() for group in _dead(_by_actors(_job_groups()))]


def held_by_actors() -> list[str]:
    """The ids (hex) of this job's held placement groups that an actor created, live or dead:
    after a search, the worker groups of Train runs that have not finished dying."""
    return [group.placement_group_id.hex() for group in _by_actors(_job_groups())]


def free_orphaned() -> int:
    """Remove this job's orphaned placement groups; how many it removed."""
    return _free(_dead(_by_actors(_job_groups())))


def settle(timeout_s: float = 10.0, poll_s: float = 0.2) -> None:
    """Free orphans until no worker group of this job is left, or ``timeout_s`` has passed.

    For the end of a search: Tune has just killed its last trials, and their controllers die a
    moment later. A group still held at the deadline belongs to a live actor and is left alone.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        held = _by_actors(_job_groups())  # one read of the GCS a round
        if _free(_dead(held)) == len(held) or time.monotonic() > deadline:
            return
        time.sleep(poll_s)


def _free(groups: list[Any]) -> int:
    """Remove ``groups``; how many it removed.

    Never raises: it runs in Tune callbacks, where an exception aborts the whole search.
    """
    freed = 0
    for group in groups:
        group_hex = group.placement_group_id.hex()
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(group.placement_group_id)))
            freed += 1
            log.debug("freed the workers of a killed Train run (placement group %s)",
                      group_hex[:8])
        except Exception as err:  # noqa: BLE001 - see the docstring
            log.warning("could not free placement group %s: %s", group_hex[:8], err)
    return freed


def _by_actors(groups: list[Any]) -> list[Any]:
    """The groups an actor created (a driver's or a task's carry Ray's nil actor id)."""
    nil = ray.ActorID.nil().binary()
    return [group for group in groups if group.creator_actor_id != nil]


def _dead(groups: list[Any]) -> list[Any]:
    """The groups whose creator has died, as the GCS records it."""
    return [group for group in groups if group.creator_actor_dead]


def _job_groups() -> list[Any]:  # gcs_pb2.PlacementGroupTableData, untyped by Ray
    """This job's placement groups that still hold (or wait for) resources, not detached.

    Read from the GCS through Ray's private state accessor, whose public wrapper
    (``ray.util.placement_group_table``) drops the creator fields. Another Ray, or a Ray Client
    driver, may lack it: then nothing is found, and the reason is logged once.
    """
    try:
        from ray._private.state import state
        from ray.core.generated import gcs_pb2

        table: Any = gcs_pb2.PlacementGroupTableData  # type: ignore[attr-defined]  # generated
        rows = [table.FromString(raw)
                for raw in state._connect_and_get_accessor().get_placement_group_table()]
        job = bytes.fromhex(ray.get_runtime_context().get_job_id())
        removed = table.REMOVED
    except Exception as err:  # noqa: BLE001 - a missing private API must not stop a search
        if not _UNREADABLE:
            _UNREADABLE.append(True)
            log.warning("cannot read placement groups from the GCS (%s): the workers of a "
                        "stopped trial may stay reserved until the search ends", err)
        return []
    return [row for row in rows
            if row.creator_job_id == job and row.state != removed and not row.is_detached]
