"""The shipped YAML files: search spaces load strictly; deploy manifests have what they promise."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from flyp_ray import cli, config, preflight
from flyp_ray.data import transfer
from flyp_ray.distributed import submit
from flyp_ray.finetune.model import tiny_config_path
from tests.support import REPO

ROOT = REPO
SEARCH_SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))
DEPLOY = ROOT / "deploy"
REAL = {"iwildcam", "fmow", "camelyon17", "csv_example"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kind(path: Path, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs(path) if d.get("kind") == kind]
    return doc


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# --- search_spaces/ ------------------------------------------------------------------------


def test_one_file_per_data_set() -> None:
    # The transfer and few-shot sets have FLYP's own settings (tests/data/test_transfer.py
    # checks them); tests/data/test_imagenet.py checks imagenet's.
    assert {p.stem for p in SEARCH_SPACES} == (REAL | {"synthetic", "imagenet"}
                                                | set(transfer.NAMES))


@pytest.mark.parametrize("path", SEARCH_SPACES, ids=lambda p: p.stem)
def test_search_space_loads_strictly(path: Path) -> None:
    cfg = config.load(path)
    assert cfg.dataset.name == path.stem.removesuffix("_example")
    # The header names the command that runs this file (big_vision style).
    header = path.read_text().split("\n\n")[0]
    assert f"flyp-ray tune search_spaces/{path.name}" in header
    space = cfg.search.space
    assert {"lr", "weight_decay", "temperature"} <= set(space)
    assert space["lr"].log and space["temperature"].log
    assert cfg.search.scheduler.type == "asha"
    # Every corner of the space is a TrainConfig the loop accepts.
    for end in ("low", "high"):
        config.with_train(cfg, **{k: getattr(s, end) for k, s in space.items()})


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_data_sets_use_the_paper_settings(name: str) -> None:
    cfg = config.load(ROOT / "search_spaces" / f"{name}.yaml")
    t = cfg.train
    assert (cfg.model.arch, cfg.model.pretrained) == ("ViT-B-16", "openai")
    assert (t.method, t.lr, t.weight_decay, t.batch_size) == ("flyp", 1.0e-5, 0.2, 256)
    assert t.epochs == {"camelyon17": 10, "csv_example": 10}.get(name, 20)
    assert t.warmup_steps == 500 and t.precision == "bf16"
    assert cfg.resources.gpus_per_worker >= 1


@pytest.mark.parametrize("path", [p for p in SEARCH_SPACES if p.stem != "synthetic"],
                         ids=lambda p: p.stem)
def test_gpu_configs_feed_the_gpu(path: Path) -> None:
    # Decoded once into the node's disk cache, read by loader processes on every CPU but one.
    cfg = config.load(path)
    assert cfg.resources.gpus_per_worker >= 1 and cfg.resources.cpus_per_worker >= 2
    assert (cfg.dataset.cache, cfg.dataset.loader_workers) == ("disk", -1)
    assert preflight.data_path_warnings(cfg) == []


def test_synthetic_demo_validates_from_any_directory(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # the model JSON is found relative to the YAML, not the cwd
    path = ROOT / "search_spaces" / "synthetic.yaml"
    cfg = config.load(path)
    assert Path(cfg.model.arch).resolve() == tiny_config_path().resolve()
    assert cfg.model.pretrained is None and cfg.resources.gpus_per_worker == 0
    assert cli.main(["validate", str(path)]) == 0


# --- deploy/ -------------------------------------------------------------------------------


def test_every_deploy_yaml_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert {p.relative_to(DEPLOY).as_posix() for p in files} >= {
        "raycluster.yaml", "rayjob.yaml", "runtime_env.yaml", "cluster-aws.yaml",
        "mlflow/mlflow.yaml"}
    for path in files:
        assert _docs(path), path


def test_raycluster_head_gpu_workers_autoscaling_auth_and_shared_storage() -> None:
    path = DEPLOY / "raycluster.yaml"
    cluster = _kind(path, "RayCluster")
    pvc = _kind(path, "PersistentVolumeClaim")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # dashboard not public
    assert not head.get("enableIngress", False)
    (gpu,) = [g for g in spec["workerGroupSpecs"]
              if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    assert gpu["maxReplicas"] >= 1
    # The same claim, at the same path, on every pod: that path is `storage`.
    mounts = set()
    for pod in (head["template"]["spec"], gpu["template"]["spec"]):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["volumes"] if "persistentVolumeClaim" in v}
        for mount in pod["containers"][0]["volumeMounts"]:
            if mount["name"] in claims:
                assert claims[mount["name"]] == pvc["metadata"]["name"]
                mounts.add(mount["mountPath"])
    assert mounts == {"/mnt/shared"}
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_rayjob_runs_flyp_ray_tune_on_the_cluster() -> None:
    job = _kind(DEPLOY / "rayjob.yaml", "RayJob")
    cluster = _kind(DEPLOY / "raycluster.yaml", "RayCluster")
    spec = job["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[0] == "flyp-ray" or words[:3] == ["python", "-m", "flyp_ray"]
    args = words[1:] if words[0] == "flyp-ray" else words[3:]
    parsed = cli.parser().parse_args(args)
    assert parsed.command == "tune" and parsed.config == "search_spaces/iwildcam.yaml"
    cfg = config.load(ROOT / parsed.config, parsed.overrides)
    assert cfg.storage.startswith("/mnt/shared/")
    assert spec["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= {"working_dir", "excludes", "env_vars", "pip", "py_modules"}
    # The submitter authenticates with the cluster's token.
    env = _env(spec["submitterPodTemplate"]["spec"]["containers"][0])
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    secret = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": cluster["spec"]["authOptions"]["secretName"], "key": "auth_token"}


def test_runtime_env_matches_what_submit_builds() -> None:
    from ray.runtime_env import RuntimeEnv

    raw = yaml.safe_load((DEPLOY / "runtime_env.yaml").read_text())
    RuntimeEnv(**raw)  # Ray's own type checks
    assert set(raw) <= {"working_dir", "excludes", "env_vars"}
    assert raw["working_dir"] == "."
    assert raw["excludes"] == list(submit.ALWAYS_EXCLUDED)


def test_mlflow_server_uses_postgres_basic_auth_and_allowed_hosts() -> None:
    script = (DEPLOY / "mlflow" / "start-mlflow.sh").read_text()
    for flag in ("--app-name basic-auth", "--allowed-hosts", "--artifacts-destination",
                 "--backend-store-uri"):
        assert flag in script
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY" in script
    deployment = _kind(DEPLOY / "mlflow" / "mlflow.yaml", "Deployment")
    env = _env(deployment["spec"]["template"]["spec"]["containers"][0])
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://")
    assert env["MLFLOW_AUTH_DATABASE_URI"]["value"].startswith("postgresql://")
    for secret in ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert "secretKeyRef" in env[secret]["valueFrom"]  # never a literal in the manifest
    hosts = env["MLFLOW_ALLOWED_HOSTS"]["value"].split(",")
    assert "mlflow.mlflow.svc.cluster.local:5000" in hosts and "localhost:5000" in hosts
    service = next(d for d in _docs(DEPLOY / "mlflow" / "mlflow.yaml")
                   if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_mlflow_start_script_flags_exist_in_this_mlflow() -> None:
    script = (DEPLOY / "mlflow" / "start-mlflow.sh").read_text()
    command = script[script.index("exec mlflow server"):]
    flags = {w for w in command.split() if w.startswith("--")}
    help_text = subprocess.run([sys.executable, "-m", "mlflow", "server", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert flags and all(f in help_text for f in flags), flags
    syntax = subprocess.run(["sh", "-n", str(DEPLOY / "mlflow" / "start-mlflow.sh")], check=False)
    assert syntax.returncode == 0


def test_cluster_launcher_yaml_fits_rays_schema() -> None:
    import jsonschema
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    raw = yaml.safe_load((DEPLOY / "cluster-aws.yaml").read_text())
    jsonschema.validate(raw, json.loads(schema_path.read_text()))
    assert raw["provider"]["type"] == "aws"
    workers = raw["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 < workers["max_workers"]  # autoscaled, to zero
    assert "RAY_AUTH_MODE=token" in " ".join(raw["docker"]["run_options"])
