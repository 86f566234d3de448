"""What the Ray cluster a command will run on can hold, known before this process starts Ray.

A worker group that no node set can hold would wait for resources that never come, so
``validate``, ``train``, ``tune``, ``tune-all`` and ``compare`` refuse it first, with the line of
:func:`check_fits`. The cluster is the one ``ray.init()`` would
give the command:

- a new local cluster (no ``RAY_ADDRESS``, no ``ray start`` cluster on this machine, or
  ``RAY_ADDRESS=local``): sized by Ray's own code for a new node (``ResourceAndLabelSpec``:
  CPUs from the affinity mask and cgroup quota, GPUs from Ray's accelerator detection, which
  respects ``CUDA_VISIBLE_DEVICES``), so nothing is started to find out;
- a cluster to join (``RAY_ADDRESS`` host:port, ``auto``, or the ``ray start`` cluster that
  Ray's address file names): its alive nodes' resources, asked of its GCS as ``ray status``
  asks, without joining it as a driver;
- ``ray://`` (Ray Client): joined for the moment it takes to ask.

A cluster whose autoscaler may add nodes gets a warning instead of a refusal: the resources may
come. Where the autoscaler has told the GCS its node groups (Ray's cluster config, which Ray
Train reads for the same check), their maximum decides; otherwise an autoscaler that names its
node types (not Ray's read-only one, which only mirrors the nodes it finds) is taken to be able
to add what is missing.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from flyp_ray.config import Config
from flyp_ray.errors import BadInput, ConfigError, first_line

GCS_TIMEOUT_S = 10
RESOURCES = ("CPU", "GPU")  # what a worker group asks for

KvGet = Callable[[bytes, bytes | None], bytes | None]


def _untyped(module: str) -> Any:
    """A module of Ray's compiled core or generated protobufs, which carry no type stubs."""
    return importlib.import_module(module)


@dataclasses.dataclass(frozen=True)
class Capacity:
    """What a cluster holds now and whether, or up to what, its autoscaler may grow it."""

    where: str
    now: dict[str, float]
    autoscaler: bool = False
    most: dict[str, float] | None = None  # the autoscaler's stated limit, where it states one


def check(cfg: Config) -> list[str]:
    """Refuse a worker group the command's cluster cannot hold; warnings where it may grow."""
    return judge(cfg, planned())


def judge(cfg: Config, capacity: Capacity) -> list[str]:
    """The warnings about ``cfg``'s worker group on ``capacity``; a ConfigError if it never fits."""
    missing = shortfalls(cfg, capacity.now)
    if missing and not capacity.autoscaler:
        check_fits(cfg, capacity.now)  # raises the one line a started run gives
    found = []
    for key, name, need, have in missing:
        limit = "how far is not known here"
        if capacity.most is not None:
            most = capacity.most.get(name, 0.0)
            if need > most:
                raise ConfigError(cfg.source, f"resources.{key}", f"{cfg.resources.workers} "
                                  f"worker(s) need {need:g} {name}, but the Ray cluster has "
                                  f"{have:g} and its autoscaler can grow it to {most:g}")
            limit = f"up to {most:g}"
        found.append(f"{cfg.source}: resources.{key}: {cfg.resources.workers} worker(s) need "
                     f"{need:g} {name} and {capacity.where} has {have:g} now: its autoscaler "
                     f"may add them ({limit}); the run waits until it does")
    return found


def shortfalls(cfg: Config, cluster: dict[str, float]) -> list[tuple[str, str, float, float]]:
    """``(key, resource, need, have)`` for each resource the worker group needs more of."""
    r = cfg.resources
    found = []
    for name, key, per_worker in (("GPU", "gpus_per_worker", r.gpus_per_worker),
                                  ("CPU", "cpus_per_worker", r.cpus_per_worker)):
        need, have = r.workers * per_worker, cluster.get(name, 0.0)
        if need > have:
            found.append((key, name, need, have))
    return found


def check_fits(cfg: Config, cluster: dict[str, float]) -> None:
    """Refuse a worker group that needs more GPUs or CPUs than the whole cluster has."""
    for key, name, need, have in shortfalls(cfg, cluster)[:1]:
        raise ConfigError(
            cfg.source, f"resources.{key}", f"{cfg.resources.workers} worker(s) x "
            f"{getattr(cfg.resources, key):g} {name} need {need:g}, but the Ray cluster has "
            f"{have:g}")


def planned() -> Capacity:
    """The capacity of the cluster that ``cluster.init_ray`` would run this command on."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return connected()
    address = os.environ.get("RAY_ADDRESS") or None
    if address == "local":
        return local()
    if address is not None and address.startswith("ray://"):
        return through_client(address)
    target = bootstrap_address(address)
    if target is None:
        return local()
    return of_gcs(target, shown=address if address not in (None, "auto") else None)


def local() -> Capacity:
    """What the local cluster that ``ray.init()`` starts would have (nothing is started)."""
    from ray._private.resource_and_label_spec import ResourceAndLabelSpec

    # The spec ray.init() resolves for its new head node, with no num_cpus/num_gpus given,
    # as cluster.init_ray gives none. The IP only names the node: no lookup is needed.
    spec = ResourceAndLabelSpec().resolve(is_head=True, node_ip_address="127.0.0.1")
    return Capacity("this machine", {"CPU": float(spec.num_cpus or 0),
                                     "GPU": float(spec.num_gpus or 0)})


def bootstrap_address(address: str | None) -> str | None:
    """The GCS address ``ray.init(address)`` joins, or None where it starts a local cluster.

    Without an address (or with ``auto``) Ray joins the ``ray start`` cluster its address file
    names; ``auto`` with no cluster to find is an error there, and here.
    """
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(address)  # type: ignore[arg-type] # None is fine
    except (ConnectionError, ValueError) as err:
        raise BadInput(f"RAY_ADDRESS: {address!r}: {first_line(err)}") from None


def of_gcs(address: str, shown: str | None = None) -> Capacity:
    """Ask the GCS at ``address`` what its alive nodes hold and about its autoscaler.

    ``shown``: the address as the user gave it (Ray resolves ``127.0.0.1`` to the node's IP).
    """
    raylet = _untyped("ray._raylet")
    autoscaler_pb2 = _untyped("ray.core.generated.autoscaler_pb2")
    gcs_pb2 = _untyped("ray.core.generated.gcs_pb2")
    try:
        # Ray's GCS client with a bounded wait, as Ray's own async client makes it (GcsClient
        # waits for the GCS longer, and retries some errors until it ends the process).
        gcs = raylet.InnerGcsClient.standalone(address, cluster_id=None,
                                               timeout_ms=GCS_TIMEOUT_S * 1000)
        nodes = gcs.get_all_node_info(timeout=GCS_TIMEOUT_S)
        now: dict[str, float] = {}
        for info in nodes.values():
            if info.state == gcs_pb2.GcsNodeInfo.ALIVE:
                for name, amount in info.resources_total.items():
                    now[name] = now.get(name, 0.0) + amount

        def kv_get(key: bytes, namespace: bytes | None) -> bytes | None:
            return gcs.internal_kv_get(key, namespace=namespace, timeout=GCS_TIMEOUT_S)

        status = autoscaler_pb2.GetClusterStatusReply.FromString(
            gcs.get_cluster_status(timeout_s=GCS_TIMEOUT_S))
        autoscaler, most = autoscaler_of(kv_get, status)
    except Exception as err:  # noqa: BLE001 - the GCS's RPC errors have no common base here
        raise BadInput(f"RAY_ADDRESS: the Ray cluster at {shown or address!r} did not say what it "
                       f"holds ({type(err).__name__}: {first_line(err, 200)})") from None
    return Capacity(f"the Ray cluster at {shown or address}", now, autoscaler, most)


def connected() -> Capacity:
    """The cluster this process is connected to (a test session's, or a run's after init)."""
    import ray

    if ray.util.client.ray.is_connected():  # Ray Client: the GCS is not reachable from here
        from ray.experimental import internal_kv

        def kv_get(key: bytes, namespace: bytes | None) -> bytes | None:
            return internal_kv._internal_kv_get(key, namespace=namespace)  # noqa: SLF001

        autoscaler, most = autoscaler_of(kv_get, None)
        return Capacity("the Ray cluster", dict(ray.cluster_resources()), autoscaler, most)
    return of_gcs(ray.get_runtime_context().gcs_address)


def through_client(address: str) -> Capacity:
    """Join a ``ray://`` cluster as a Ray Client for as long as it takes to ask it."""
    import ray

    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, TimeoutError) as err:
        raise BadInput(f"RAY_ADDRESS: cannot reach a Ray cluster at {address!r} "
                       f"({type(err).__name__})") from None
    try:
        return dataclasses.replace(connected(), where=f"the Ray cluster at {address}")
    finally:
        ray.shutdown()


def autoscaler_of(kv_get: KvGet, status: Any) -> tuple[bool, dict[str, float] | None]:
    """(an autoscaler that may add nodes runs, the most it may grow the cluster to if stated).

    ``status`` is the GCS's ``GetClusterStatusReply`` (autoscaler v2 reports there), or None.
    """
    from ray._private.state import GlobalState

    raylet = _untyped("ray._raylet")
    autoscaler_pb2 = _untyped("ray.core.generated.autoscaler_pb2")
    namespace = raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode()
    stated = kv_get(raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(), namespace)
    if stated:
        config = autoscaler_pb2.ClusterConfig.FromString(stated)
        if config.node_group_configs:
            # Ray Train's own rule (GlobalState.get_max_resources_from_cluster_config).
            most = {name: GlobalState._calculate_max_resource_from_cluster_config(  # noqa: SLF001
                config, name) or 0 for name in RESOURCES}
            return True, {name: float(v) for name, v in most.items()}
    return _v1_launches_nodes(kv_get) or _v2_launches_nodes(status), None


def _v1_launches_nodes(kv_get: KvGet) -> bool:
    """The v1 autoscaler's status (what ``ray status`` prints) names node types of a config.

    The read-only autoscaler of a ``ray start`` cluster names each node ``node_<its id>``.
    """
    from ray._private import ray_constants
    from ray.autoscaler._private.util import format_readonly_node_type

    raw = kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS.encode(), None)
    if not raw:
        return False
    report = json.loads(raw).get("autoscaler_report") or {}
    types = (report.get("node_type_mapping") or {}).items()
    return any(kind != format_readonly_node_type(node) for node, kind in types)


def _v2_launches_nodes(status: Any) -> bool:
    """The v2 autoscaler reports, and the nodes carry the node types it launched them as."""
    if status is None or not status.autoscaling_state.autoscaler_state_version:
        return False
    return any(node.ray_node_type_name for node in status.cluster_resource_state.node_states)
