"""A ``ray start --head`` of the test's own, to point ``RAY_ADDRESS`` at: read-only, or with a
real autoscaler (Ray's fake multi-node provider, which launches nodes as local processes).

The head keeps its address file in its own temp folder (``--temp-dir``), so no other Ray on the
machine joins it, and it is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.second_ray import BIN, _stop, wait_until
from tests.support.servers import agent_port_flags, free_port

# Ray's fake multi-node provider (ray/autoscaler/_private/fake_multi_node): the monitor runs
# the v1 autoscaler with these node types; nodes it launches are raylets on this machine. No
# worker node is launched unless a task asks (min_workers 0), and validate asks nothing.
FAKE_AUTOSCALING: dict[str, Any] = {
    "cluster_name": "fake_multinode",
    "max_workers": 2,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                 "disable_node_updaters": True, "disable_launch_config_check": True},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
        "ray.worker.gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {},
                           "min_workers": 0, "max_workers": 2},
    },
    "head_node_type": "ray.head.default",
    "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 1, "docker": {},
    "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
    "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [],
}


@contextlib.contextmanager
def ray_head(*, num_cpus: int = 1, autoscaling: bool = False) -> Iterator[str]:
    """Yield the GCS address of a new head once its autoscaler (monitor) has reported."""
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray puts sockets in it
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    command = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}",
               f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=false",
               f"--ray-client-server-port={free_port()}", f"--temp-dir={temp_dir}",
               "--disable-usage-stats", *agent_port_flags()]
    if autoscaling:
        config = Path(temp_dir) / "autoscaling.json"
        config.write_text(json.dumps(FAKE_AUTOSCALING))
        command.append(f"--autoscaling-config={config}")
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    head = subprocess.Popen(command, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _monitor_reported(address), 120), "the head did not start"
        yield address
    finally:
        _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _monitor_reported(address: str) -> bool:
    """Whether the head's GCS answers and its autoscaler has written its first status."""
    import socket

    from ray._private import ray_constants
    from ray._raylet import InnerGcsClient

    try:
        host, port = address.rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=1).close()
        gcs = InnerGcsClient.standalone(address, cluster_id=None, timeout_ms=5000)
        status = gcs.internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS.encode(), timeout=5)
    except Exception:  # noqa: BLE001 - not up yet
        return False
    return bool(status) and "autoscaler_report" in json.loads(status)
