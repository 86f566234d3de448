"""The worker groups of killed Train runs are found in the GCS and freed, and no other group."""

from __future__ import annotations

import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from flyp_ray.distributed import orphans


@ray.remote(num_cpus=0)
class Owner:
    """Creates placement groups as a Train controller does; may own another Owner, as a trial's
    process owns its controller."""

    def reserve(self, cpus: float) -> str:
        group = placement_group([{"CPU": cpus}])
        ray.get(group.ready(), timeout=60)
        return str(group.id.hex())

    def reserve_below(self, cpus: float) -> str:
        self.child = Owner.remote()  # type: ignore[attr-defined]
        return str(ray.get(self.child.reserve.remote(cpus)))


def state(group_hex: str) -> str:
    return str(ray.util.placement_group_table()[group_hex]["state"])


def test_the_groups_of_killed_actors_are_freed_and_no_other(ray_session: None) -> None:
    by_driver = placement_group([{"CPU": 0.1}])  # as Tune reserves its trials
    ray.get(by_driver.ready(), timeout=60)
    live, killed, trial = Owner.remote(), Owner.remote(), Owner.remote()  # type: ignore
    kept = ray.get(live.reserve.remote(0.1))
    lost = ray.get(killed.reserve.remote(0.1))
    lost_below = ray.get(trial.reserve_below.remote(0.1))  # its child dies with it
    try:
        assert orphans.orphaned() == []
        ray.kill(killed)
        ray.kill(trial)
        deadline = time.monotonic() + 30
        while set(orphans.orphaned()) != {lost, lost_below}:
            assert time.monotonic() < deadline, orphans.orphaned()
            time.sleep(0.1)
        # Ray keeps them for the rest of the job: this is what a killed trial leaves.
        assert state(lost) == state(lost_below) == "CREATED"

        assert orphans.free_orphaned() == 2
        assert state(lost) == state(lost_below) == "REMOVED"
        assert state(kept) == state(by_driver.id.hex()) == "CREATED"
        assert orphans.orphaned() == [] and orphans.held_by_actors() == [kept]

        started = time.monotonic()
        orphans.settle(timeout_s=0.5)  # a live actor's group is waited for, then left
        assert time.monotonic() - started < 5 and state(kept) == "CREATED"

        ray.kill(live)  # as Tune kills the last trials before the search ends
        orphans.settle(timeout_s=30)
        assert state(kept) == "REMOVED" and orphans.held_by_actors() == []
    finally:
        for actor in (live, killed, trial):
            ray.kill(actor)
        remove_placement_group(by_driver)
