"""A Ray Train run that loses the node its worker runs on, in a two-node local Ray cluster.

Run as ``python -m tests.support.node_loss FOLDER`` by ``tests/distributed/test_faults.py``: it
starts its own cluster (a head and a worker node, ``ray.cluster_utils.Cluster``), so the session's
shared Ray is untouched. The head's only CPU is held by a placeholder actor until the run's worker
group is placed, which puts the worker on the worker node; that node is then removed without grace
once the first epoch's checkpoint is kept, and the run must go on on the head from its last
checkpoint. Prints one JSON line last: the nodes the worker groups were placed on, the outcome, the
epochs in MLflow and the number of reports Ray Train counted.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import ray  # noqa: E402
import ray.util  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from flyp_ray import config
from flyp_ray.distributed import trainer
from flyp_ray.distributed.cluster import runtime_env  # noqa: E402
from flyp_ray.search import trial
from tests.support.configs import tiny_config, write_config  # noqa: E402

RUN = "node-loss"
# Notice a dead node within seconds rather than Ray's default half minute.
FAST_HEALTH_CHECK = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


@ray.remote(num_cpus=1)
class Placeholder:
    """Holds the head's CPU so that the first worker group has to go to the worker node."""

    def ready(self) -> bool:
        return True


def group_nodes() -> set[str]:
    """The nodes that hold a bundle of a live placement group (the run's worker group)."""
    nodes: set[str] = set()
    for group in ray.util.placement_group_table().values():
        if group["state"] == "CREATED":
            nodes.update(group["bundles_to_node_id"].values())
    return nodes


def wait_for(condition: Any, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def main(folder: Path) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "_system_config": FAST_HEALTH_CHECK})
    worker_node = cluster.add_node(num_cpus=1)
    repo = str(Path(__file__).resolve().parents[2])
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env=runtime_env({"PYTHONPATH": repo}))
    cluster.wait_for_nodes()
    head_id = ray.get_runtime_context().get_node_id()
    worker_id = worker_node.node_id
    placeholder = Placeholder.options(  # type: ignore[attr-defined]
        scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=False)).remote()
    ray.get(placeholder.ready.remote())

    raw = tiny_config(folder, dataset={"subsample": 96}, train={"epochs": 3, "batch_size": 16},
                      resources={"workers": 1, "cpus_per_worker": 1, "max_failures": 2})
    cfg = config.load(write_config(folder / "c.yaml", raw))
    outcome: list[Any] = []
    errors: list[str] = []

    def train() -> None:
        try:
            outcome.append(trainer.train(cfg, name=RUN).as_json())
        except Exception as err:  # noqa: BLE001 - reported in the JSON line
            errors.append(f"{type(err).__name__}: {err}"[-3000:])

    thread = threading.Thread(target=train)
    thread.start()
    run_path = Path(trainer.storage_path(cfg), RUN)

    def first_checkpoint_kept() -> bool:
        try:  # the snapshot may be caught mid-write
            return trial.latest_checkpoint(str(run_path)) is not None
        except Exception:  # noqa: BLE001
            return False

    wait_for(lambda: worker_id in group_nodes() or not thread.is_alive(), "the worker group")
    first_nodes = group_nodes()
    wait_for(lambda: first_checkpoint_kept() or not thread.is_alive(), "epoch 1's checkpoint")
    kept = trial.latest_checkpoint(str(run_path))
    ray.kill(placeholder)  # the head's CPU is free for the restarted worker group
    cluster.remove_node(worker_node, allow_graceful=False)
    removed_at = time.monotonic()
    later_nodes: set[str] = set()
    while thread.is_alive():
        later_nodes |= group_nodes()
        time.sleep(0.2)
    thread.join()

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run_id = outcome[0]["mlflow_run_id"] if outcome else None
    # Ray Train counts the run's reports: one per epoch if the new group went on from epoch
    # 1's checkpoint, more if it had started over.
    snapshot = json.loads((run_path / "checkpoint_manager_snapshot.json").read_text())
    epochs = sorted(m.step for m in client.get_metric_history(run_id, "epoch")) if run_id else []
    print(json.dumps({"head": head_id, "worker": worker_id, "first_nodes": sorted(first_nodes),
                      "later_nodes": sorted(later_nodes), "outcome": outcome[0] if outcome else
                      None, "errors": errors, "mlflow_epochs": epochs,
                      "reports": int(snapshot["current_report_index"]),
                      "removed_after": Path(kept).name if kept else None,
                      "seconds_after_removal": round(time.monotonic() - removed_at, 1)}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
