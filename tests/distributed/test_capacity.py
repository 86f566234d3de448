"""A worker group the cluster cannot hold is refused before Ray starts, with the line a started
run gives; on a cluster whose autoscaler may add what is missing, it is a warning.

Real clusters throughout: this machine as ``ray.init()`` sizes it (the test compares with a
real ``ray.init``), a real ``ray start --head`` (its autoscaler read-only), one with Ray's
real v1 autoscaler over its fake multi-node provider, and Ray's cluster config reported to a
real GCS through the RPC that autoscaler v2 uses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from flyp_ray import config
from flyp_ray.distributed import capacity
from flyp_ray.errors import ConfigError
from tests.support import REPO
from tests.support.configs import tiny_config, write_config
from tests.support.ray_head import ray_head

pytestmark = pytest.mark.slow


def run_command(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flyp_ray", *args], cwd=cwd, text=True,
                          capture_output=True, env={**env, "PYTHONPATH": str(REPO)}, timeout=300)


def no_ray_env(tmp: Path, **extra: str) -> dict[str, str]:
    """No RAY_ADDRESS, and a Ray temp folder of the test's own: no `ray start` cluster's
    address file to join, and a session folder there if anything started Ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_TMPDIR": str(tmp / "raytmp"), **extra}


def cfg_of(tmp: Path, **resources: Any) -> config.Config:
    raw = tiny_config(tmp, resources=resources, train={"batch_size": 16})
    return config.load(write_config(tmp / "c.yaml", raw))


def test_this_machine_is_sized_as_ray_init_sizes_it() -> None:
    # A real ray.init() on this machine, in its own process, against what validate assumes.
    temp = tempfile.mkdtemp(prefix="rayc", dir="/tmp")
    script = ("import json, ray; ray.init(address='local', include_dashboard=False, "
              f"_temp_dir={temp!r}); r = ray.cluster_resources(); "
              "print(json.dumps({k: r.get(k, 0.0) for k in ('CPU', 'GPU')})); ray.shutdown()")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        done = subprocess.run([sys.executable, "-c", script], text=True, capture_output=True,
                              env=env, timeout=300)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    started = json.loads(done.stdout.strip().splitlines()[-1])
    assert capacity.local().now == started


def test_more_gpus_than_this_machine_is_refused_before_ray_starts(tmp_path: Path) -> None:
    # CUDA_VISIBLE_DEVICES="" hides every GPU from Ray, on any machine.
    raw = tiny_config(tmp_path, resources={"gpus_per_worker": 1})
    path = write_config(tmp_path / "c.yaml", raw)
    env = no_ray_env(tmp_path, CUDA_VISIBLE_DEVICES="")
    line = (f"flyp-ray: error: {path}: resources.gpus_per_worker: 1 worker(s) x 1 GPU need 1, "
            f"but the Ray cluster has 0")
    for command in ("validate", "train"):
        done = run_command(command, str(path), env=env, cwd=tmp_path)
        assert (done.returncode, done.stderr.strip()) == (2, line), (command, done.stderr)
    assert not (tmp_path / "raytmp").exists()  # no Ray session was started
    assert not (tmp_path / "results").exists()


def test_more_cpus_than_this_machine_is_refused(tmp_path: Path) -> None:
    have = capacity.local().now["CPU"]
    with pytest.raises(ConfigError, match=rf"resources.cpus_per_worker: 1 worker\(s\) x "
                                          rf"{have + 1:g} CPU need {have + 1:g}, but the Ray "
                                          rf"cluster has {have:g}$"):
        capacity.judge(cfg_of(tmp_path, cpus_per_worker=have + 1), capacity.local())


def test_a_ray_address_cluster_is_asked_what_it_holds(tmp_path: Path) -> None:
    with ray_head(num_cpus=1) as address:
        held = capacity.of_gcs(address)
        assert (held.now["CPU"], held.now.get("GPU", 0.0), held.autoscaler) == (1.0, 0.0, False)
        with pytest.raises(ConfigError, match=r"x 2 CPU need 2, but the Ray cluster has 1$"):
            capacity.judge(cfg_of(tmp_path, cpus_per_worker=2), held)
        assert capacity.judge(cfg_of(tmp_path, cpus_per_worker=1), held) == []

        path = write_config(tmp_path / "gpu.yaml",
                            tiny_config(tmp_path, resources={"gpus_per_worker": 1}))
        env = {**no_ray_env(tmp_path), "RAY_ADDRESS": address}
        done = run_command("validate", str(path), env=env, cwd=tmp_path)
        assert (done.returncode, done.stderr.strip()) == (
            2, f"flyp-ray: error: {path}: resources.gpus_per_worker: 1 worker(s) x 1 GPU need "
               f"1, but the Ray cluster has 0"), done.stderr

        fits = write_config(tmp_path / "fits.yaml", tiny_config(tmp_path))
        done = run_command("validate", str(fits), env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert f"RAY_ADDRESS {address}: takes connections" in done.stdout.splitlines()

        # What autoscaler v2 reports to the GCS: node groups and their maximum counts.
        report_cluster_config(address, gpus_per_node=1, max_nodes=2)
        stated = capacity.of_gcs(address)
        assert (stated.autoscaler, stated.most) == (True, {"CPU": 2.0, "GPU": 2.0})
        (warning,) = capacity.judge(cfg_of(tmp_path, workers=2, gpus_per_worker=1), stated)
        assert warning.endswith(f"resources.gpus_per_worker: 2 worker(s) need 2 GPU and the Ray "
                                f"cluster at {address} has 0 now: its autoscaler may add them "
                                f"(up to 2); the run waits until it does"), warning
        with pytest.raises(ConfigError, match=r"4 worker\(s\) need 4 GPU, but the Ray cluster "
                                              r"has 0 and its autoscaler can grow it to 2$"):
            capacity.judge(cfg_of(tmp_path, workers=4, gpus_per_worker=1), stated)


def test_an_autoscaling_cluster_gets_a_warning_not_a_refusal(tmp_path: Path) -> None:
    path = write_config(tmp_path / "gpu.yaml",
                        tiny_config(tmp_path, resources={"gpus_per_worker": 1}))
    with ray_head(autoscaling=True) as address:
        held = capacity.of_gcs(address)
        assert (held.now.get("GPU", 0.0), held.autoscaler, held.most) == (0.0, True, None)
        env = {**no_ray_env(tmp_path), "RAY_ADDRESS": address}
        done = run_command("validate", str(path), env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "resources." in line]
    assert warnings == [
        f"flyp-ray: warning: {path}: resources.gpus_per_worker: 1 worker(s) need 1 GPU and the "
        f"Ray cluster at {address} has 0 now: its autoscaler may add them (how far is not known "
        f"here); the run waits until it does"]


def report_cluster_config(address: str, *, gpus_per_node: int, max_nodes: int) -> None:
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    group = autoscaler_pb2.NodeGroupConfig(name="gpu", min_count=0, max_count=max_nodes,
                                           resources={"CPU": 1, "GPU": gpus_per_node})
    cluster_config = autoscaler_pb2.ClusterConfig(node_group_configs=[group])
    GcsClient(address=address).report_cluster_config(cluster_config.SerializeToString())
