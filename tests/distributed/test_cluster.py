"""The Ray cluster a command starts for itself (``cluster.init_ray`` without an address)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

PROBE = """
import os, ray
from flyp_ray.distributed import cluster
cluster.init_ray()
print("niceness", ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote()))
cluster.shutdown_if_started()
"""


def test_own_cluster_runs_its_workers_at_the_commands_priority() -> None:
    """Ray's default (nice 15) lets every daemon wake-up preempt the training threads."""
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_worker_niceness", None)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"niceness {os.nice(0)}" in done.stdout.splitlines()
