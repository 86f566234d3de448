"""The processes of this test session's own Ray: found by ancestry, never by name alone.

Other Ray instances may run on the machine (other test sessions among them); a test that kills
a Train worker must kill one of its own run's, not every ``ray::RayTrainWorker`` in sight.
"""

from __future__ import annotations

import os
from pathlib import Path


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process that can be read."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    return parents


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def train_workers() -> list[int]:
    """The Ray Train worker processes of the Ray instance this process started."""
    pids = []
    for pid in descendants(os.getpid()):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if command.startswith(b"ray::RayTrainWorker"):
            pids.append(pid)
    return pids


def held_groups() -> set[str]:
    """The ids of the placement groups that hold resources in the connected Ray now.

    The session's Ray is shared by a file's tests: a test compares this before and after, so
    that what it checks is what it started.
    """
    import ray.util

    return {g["placement_group_id"] for g in ray.util.placement_group_table().values()
            if g["state"] == "CREATED"}
