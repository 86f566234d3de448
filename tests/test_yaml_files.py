"""The shipped YAML files: search spaces load strictly; deploy manifests have what they promise."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from flyp_ray import cli, config, preflight
from flyp_ray.data import transfer
from flyp_ray.data.prompts import TEMPLATES, templates_for
from flyp_ray.distributed import submit
from flyp_ray.finetune.model import tiny_config_path
from flyp_ray.serve import app as serve_app
from tests.support import REPO

ROOT = REPO
SEARCH_SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))
DEPLOY = ROOT / "deploy"
REAL = {"iwildcam", "fmow", "camelyon17", "csv_example"}  # the WILDS sets and any csv set


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kind(path: Path, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs(path) if d.get("kind") == kind]
    return doc


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# --- search_spaces/ ------------------------------------------------------------------------


def test_one_file_per_data_set() -> None:
    # Each has FLYP's own settings where FLYP ran it (the table below checks them).
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


# --- FLYP's own settings ----------------------------------------------------------------------
# The FLYP reference's run of each data set, as locuslab/FLYP's README commands give it, with
# src/args.py's defaults for what a command leaves out (--warmup_length 500, --min_lr 0). Its
# --model=ViT-B/16 goes through its clip.load: OpenAI's weights. It trains in fp32 (its
# build_model casts every weight to float; no autocast). Few-shot (src/few_shot.py): each step
# trains on the whole draw of 2 classes x k images (its --batch-size only batches evaluation),
# one step an epoch, averaged over 50 draws. A change to a file below is a decision: make it here
# too, and in docs/FIDELITY.md when it departs from the reference.


@dataclasses.dataclass(frozen=True)
class Reference:
    """One data set's fixed training values."""

    epochs: int
    lr: float
    weight_decay: float
    batch_size: int  # images per optimizer step, over all workers
    warmup_steps: int
    templates: tuple[str, ...]  # "{}" is the class name
    k_shot: int | None = None
    repeats: int = 1
    model: tuple[str, str] = ("ViT-B-16", "openai")
    precision: str = "fp32"
    method: str = "flyp"


IWILDCAM_TEMPLATES = ("a photo of {}.", "{} in the wild.")
# src/templates/fmow_template.py. "{a/an} " is its append_proper_article(c): "a" or "an", as the
# class name needs; flyp-ray's plain "{}" templates cannot choose, so they go without.
FMOW_TEMPLATES = (
    "satellite photo of a {}.", "aerial photo of a {}.",
    "satellite photo of {a/an} {}.", "aerial photo of {a/an} {}.",
    *(f"{kind} photo of a {{}} in {place}." for place in
      ("asia", "africa", "the americas", "europe", "oceania") for kind in ("satellite", "aerial")),
    "a photo of a {}.", "{}.",
)
CALTECH101_TEMPLATES = tuple(  # src/templates/caltech101_template.py: 17 forms, "a" then "the"
    form.format(article=article) for article in ("a", "the") for form in (
        "a photo of {article} {{}}.", "a painting of {article} {{}}.", "{article} plastic {{}}.",
        "a sculpture of {article} {{}}.", "a sketch of {article} {{}}.",
        "a tattoo of {article} {{}}.", "{article} toy {{}}.", "a rendition of {article} {{}}.",
        "{article} embroidered {{}}.", "{article} cartoon {{}}.",
        "{article} {{}} in a video game.", "{article} plushie {{}}.", "{article} origami {{}}.",
        "art of {article} {{}}.", "graffiti of {article} {{}}.",
        "a drawing of {article} {{}}.", "a doodle of {article} {{}}."))
STANFORD_CARS_TEMPLATES = (  # src/templates/stanfordcars_template.py
    "a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
    "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.",
    "a photo of my old {}.")
# src/templates/openai_imagenet_template.py: OpenAI's 80 prompts, string for string the list
# open_clip ships (checked against the reference's file when this table was written).
IMAGENET_TEMPLATES = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)

REFERENCE: dict[str, Reference] = {
    "iwildcam": Reference(20, 1.0e-5, 0.2, 256, 500, IWILDCAM_TEMPLATES),
    "fmow": Reference(20, 1.0e-5, 0.2, 256, 500, FMOW_TEMPLATES),
    "imagenet": Reference(10, 1.0e-5, 0.1, 512, 500, IMAGENET_TEMPLATES),
    "caltech101": Reference(100, 1.0e-5, 0.0, 256, 500, CALTECH101_TEMPLATES),
    "stanford_cars": Reference(100, 1.0e-5, 0.0, 256, 500, STANFORD_CARS_TEMPLATES),
    "pcam": Reference(20, 1.0e-6, 0.0, 2 * 16, 0, ("this is a photo of {}",), k_shot=16,
                      repeats=50),
    "rendered_sst2": Reference(20, 1.0e-5, 0.2, 2 * 16, 0, ("a {} review of a movie.",),
                               k_shot=16, repeats=50),
}
# Data sets the reference's README has no command for: the values each file takes instead.
DERIVED: dict[str, Reference] = {
    # Caltech101's and StanfordCars' values; the template is the reference's flowers102 one.
    "flowers102": Reference(100, 1.0e-5, 0.0, 256, 500, ("a photo of a {}, a type of flower.",)),
    # FLYP's WILDS values, over 10 epochs: ~300k patches make 10 epochs more steps than
    # iWildCam's 20. Not in the FLYP paper; the templates are flyp-ray's own.
    "camelyon17": Reference(10, 1.0e-5, 0.2, 256, 500, tuple(TEMPLATES["camelyon17"])),
    "csv_example": Reference(10, 1.0e-5, 0.2, 256, 500, ("a photo of a {}.",)),
}
ALL_SETS = REFERENCE | DERIVED
# Where a shipped file departs from the table on purpose: (data set, field) -> (value, why).
DEPARTURES: dict[tuple[str, str], tuple[Any, str]] = {
    **{(name, "precision"): ("bf16", "bf16 autocast on a GPU, for speed; "
                                     "--set precision=fp32 trains as the reference")
       for name in ALL_SETS},
    **{(name, "repeats"): (10, "50 draws make one trial 50 runs; --set repeats=50 is FLYP's")
       for name in ("pcam", "rendered_sst2")},
    ("fmow", "templates"): (tuple(t.replace("{a/an} ", "") for t in FMOW_TEMPLATES),
                            "a plain '{}' template cannot pick 'a' or 'an' for the class name"),
}


def _fixed(path: Path) -> dict[str, Any]:
    """A search-space file's fixed training values, in the table's terms."""
    cfg = config.load(path, [] if path.stem == "synthetic" else ["dataset.root=/data"])
    t = cfg.train
    templates = tuple(templates_for(cfg.dataset.templates, cfg.dataset.name, cfg.source))
    return {"epochs": t.epochs, "lr": t.lr, "weight_decay": t.weight_decay,
            "batch_size": t.batch_size, "warmup_steps": t.warmup_steps, "templates": templates,
            "k_shot": t.k_shot, "repeats": t.repeats, "precision": t.precision,
            "model": (cfg.model.arch, cfg.model.pretrained), "method": t.method}


@pytest.mark.parametrize("name", sorted(ALL_SETS))
def test_fixed_values_are_the_references(name: str) -> None:
    path = ROOT / "search_spaces" / f"{name}.yaml"
    expected = {field: DEPARTURES.get((name, field), (value, ""))[0]
                for field, value in dataclasses.asdict(ALL_SETS[name]).items()}
    expected["templates"] = tuple(expected["templates"])
    expected["model"] = tuple(expected["model"])
    assert _fixed(path) == expected
    cfg = config.load(path, ["dataset.root=/data"])
    # The reference's optimisation (the recipe's defaults), its schedule floor and temperature.
    resolved = config.resolve_recipe(cfg.train)
    assert {f: getattr(resolved, f) for f in config.RECIPE_FIELDS} == config.RECIPES["flyp"]
    assert (cfg.train.min_lr, cfg.train.temperature, cfg.train.learn_temperature) == (
        0.0, None, True)
    assert cfg.search.metric == "id_val/acc"  # FLYP selects on ID validation


def test_every_file_but_the_demo_has_a_row() -> None:
    assert {p.stem for p in SEARCH_SPACES} == set(ALL_SETS) | {"synthetic"}


@pytest.mark.parametrize("name", sorted(ALL_SETS))
def test_search_ranges_are_centred_on_the_references(name: str) -> None:
    path = ROOT / "search_spaces" / f"{name}.yaml"
    space = config.load(path, ["dataset.root=/data"]).search.space
    ref = ALL_SETS[name]
    lr, wd, temperature = space["lr"], space["weight_decay"], space["temperature"]
    assert lr.log and lr.low is not None and lr.high is not None
    assert math.sqrt(lr.low * lr.high) == pytest.approx(ref.lr, rel=1e-9)
    assert not wd.log and wd.low is not None and wd.high is not None
    if ref.weight_decay > 0:
        assert (wd.low + wd.high) / 2 == pytest.approx(ref.weight_decay)
    else:  # decay cannot go below the reference's 0: its edge of the range
        assert wd.low == 0.0 < wd.high
    # The reference keeps the pretrained temperature: OpenAI CLIP's 0.01.
    assert temperature.log and temperature.low is not None and temperature.high is not None
    assert math.sqrt(temperature.low * temperature.high) == pytest.approx(0.01, rel=1e-9)


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
        "raycluster.yaml", "rayjob.yaml", "rayservice.yaml", "runtime_env.yaml",
        "cluster-aws.yaml", "mlflow/mlflow.yaml"}
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


def test_retune_cronjob_submits_tune_all_changed_to_the_cluster() -> None:
    job = _kind(DEPLOY / "retune-cronjob.yaml", "CronJob")
    cluster = _kind(DEPLOY / "raycluster.yaml", "RayCluster")
    assert job["spec"]["concurrencyPolicy"] == "Forbid"  # one night at a time
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    words = container["command"]
    assert words[0] == "flyp-ray"
    submitted = cli.parser().parse_args(words[1:])
    assert submitted.command == "submit" and submitted.wait
    # KubeRay's head Service of the cluster, on the Jobs API port.
    assert submitted.address == f"http://{cluster['metadata']['name']}-head-svc:8265"
    assert submitted.working_dir == container["workingDir"] == "/app"
    assert submitted.job_command[0] == "--"
    command = cli.parser().parse_args(submitted.job_command[1:])
    assert command.command == "tune-all" and command.changed and command.budget > 0
    for path in command.configs:
        assert path.startswith("search_spaces/")
        cfg = config.load(ROOT / path, cli.overrides(command))
        assert cfg.storage.startswith("/mnt/shared/")
        assert cfg.dataset.root is not None and cfg.dataset.root.startswith("/mnt/shared/")
        assert cfg.tracking.registered_model  # promotion needs a registered model
    env = _env(container)
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    secret = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": cluster["spec"]["authOptions"]["secretName"], "key": "auth_token"}


def core_manifests() -> list[tuple[str, dict[str, Any]]]:
    """Every Kubernetes object in deploy/ that is not a KubeRay custom resource (ray.io), whose
    schemas kubernetes-validate does not ship."""
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in _docs(path):
            if "apiVersion" in doc and "kind" in doc and not doc["apiVersion"].startswith(
                    "ray.io/"):
                name = f"{doc['kind']}/{doc.get('metadata', {}).get('name')}"
                found.append((f"{path.relative_to(DEPLOY)}:{name}", doc))
    return found


@pytest.mark.parametrize("doc", [d for _, d in core_manifests()],
                         ids=[name for name, _ in core_manifests()])
def test_core_manifests_fit_kubernetes_schemas(doc: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_kubernetes_schemas_refuse_a_misspelt_key() -> None:
    import kubernetes_validate

    job = _kind(DEPLOY / "retune-cronjob.yaml", "CronJob")
    job["spec"]["schedul"] = job["spec"].pop("schedule")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)


def test_rayservice_serves_the_champion_with_the_serve_app() -> None:
    from ray.serve.schema import ServeDeploySchema

    service = _kind(DEPLOY / "rayservice.yaml", "RayService")
    cluster = _kind(DEPLOY / "raycluster.yaml", "RayCluster")
    assert service["apiVersion"] == "ray.io/v1"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.parse_obj(serve_config)  # Ray Serve's own schema of a Serve config
    (application,) = serve_config["applications"]
    module, _, name = application["import_path"].partition(":")
    assert getattr(importlib.import_module(module), name) is serve_app.build_app
    options = serve_app.ServeOptions.from_args(application["args"])  # unknown keys refused
    assert options.model_uri.startswith("models:/") and options.model_uri.endswith("@champion")
    assert options.tracking_uri == "http://mlflow.mlflow.svc.cluster.local:5000"
    assert serve_app.build_app(application["args"]) is not None
    assert application["route_prefix"] == "/"  # /invocations and /ping, as mlflow models serve
    # The same Ray, token auth and image as the training cluster; nothing exposed.
    spec = service["spec"]["rayClusterConfig"]
    assert spec["rayVersion"] == cluster["spec"]["rayVersion"]
    assert spec["authOptions"] == cluster["spec"]["authOptions"]
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert "serveService" not in service["spec"]  # KubeRay's ClusterIP <name>-serve-svc
    # Room for every replica, and each pod can reach MLflow with the account in the Secret.
    cpus = sum(float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
               * group["maxReplicas"] for group in spec["workerGroupSpecs"])
    assert options.replicas * options.num_cpus <= cpus
    for pod in [head] + spec["workerGroupSpecs"]:
        container = pod["template"]["spec"]["containers"][0]
        assert container["image"] == head["template"]["spec"]["containers"][0]["image"]
        env = _env(container)
        assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"]


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


@pytest.mark.parametrize("path", [p for p in SEARCH_SPACES if p.stem != "synthetic"],
                         ids=lambda p: p.stem)
def test_real_data_configs_recheck_their_best_configs(path: Path) -> None:
    # The best of a noisy search is biased upwards: shipped searches crown a champion by a mean.
    search = config.load(path).search
    assert search.recheck is not None and search.recheck.seeds >= 2
    assert search.recheck.top_k <= search.num_samples
