"""Leaving tuning to run by itself, end to end: ``tune-all --changed``, promotion after real
searches, two searches of one model at once, and ``flyp-ray status``: real Ray Tune + Train on
a WILDS-format folder, a real MLflow server.

The searches are as small as a search gets (one trial of one epoch on 8 training images); what
the promotion rule decides on is tested on registered models in tests/tracking/test_promotion.py.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
import ray
from mlflow.tracking import MlflowClient
from PIL import Image

from flyp_ray import cli, config
from flyp_ray.search import tune
from flyp_ray.tracking import lineage, promotion, registry, runs
from tests.support.configs import tiny_config, write_config
from tests.support.models import write_checkpoint

pytestmark = pytest.mark.slow


def wilds_config(tmp: Path, root: Path, uri: str, model: str, name: str = "iwildcam",
                 **search: Any) -> Path:
    """One trial of one epoch on the folder's 8 training images, tracked on ``uri``."""
    raw = tiny_config(tmp, dataset={"name": "iwildcam", "root": str(root), "subsample": 16},
                      train={"epochs": 1, "batch_size": 8, "warmup_steps": 1},
                      resources={"cpus_per_worker": 0.5},
                      tracking={"uri": uri, "experiment": model, "registered_model": model})
    raw["search"].update({"num_samples": 1, "scheduler": {"type": "none"}, **search})
    return write_config(tmp / f"{name}.yaml", raw)


def synthetic_champion(tmp: Path, uri: str, model: str) -> Path:
    """A synthetic data set's config whose registered model already has a champion made from
    this very config and data (its lineage tags say so): what a search before would leave."""
    tmp.mkdir()
    raw = tiny_config(tmp, dataset={"subsample": 16},
                      tracking={"uri": uri, "experiment": model, "registered_model": model})
    path = write_config(tmp / "synthetic.yaml", raw)
    cfg = config.load(path)
    run_id = runs.start_run(cfg, "made-before", {runs.KIND_TAG: "train"})
    registered = registry.log_and_register(cfg, run_id, write_checkpoint(cfg, tmp / "ckpt"),
                                           {}, lineage.tags(cfg))
    assert registered is not None
    assert promotion.promote(cfg, registered[1]).decision == "first"
    return path


def tune_all(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, Any]]]:
    code = cli.main(["tune-all", *argv])
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1])["searches"]


def search_runs(client: MlflowClient, experiment: str) -> list[str]:
    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id], f"tags.`{runs.KIND_TAG}` = 'search'")
    return sorted(r.info.run_name for r in found)


def test_changed_searches_only_what_changed_and_status_reads_it_back(
        ray_session: None, mlflow_server: str, tmp_path: Path, wilds_root: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "wilds"
    shutil.copytree(wilds_root / "iwildcam_v2.0", root / "iwildcam_v2.0")
    suffix = uuid.uuid4().hex[:6]
    wilds_model, synthetic_model = f"retune-iwildcam-{suffix}", f"retune-synthetic-{suffix}"
    wilds = wilds_config(tmp_path, root, mlflow_server, wilds_model)
    synthetic = synthetic_champion(tmp_path / "synthetic", mlflow_server, synthetic_model)
    client = MlflowClient(tracking_uri=mlflow_server)
    configs = [str(wilds), str(synthetic)]

    # 1. No champion yet for iWildCam: searched, and its first version is champion.
    code, (first, unchanged) = tune_all(capsys, "--changed", *configs)
    assert code == 0
    assert "no champion yet" in first["changed"] and first["num_completed"] == 1
    assert first["promotion"]["decision"] == "first"
    assert unchanged["unchanged"] is True and unchanged["registered_model"]["version"] == "1"
    champion = client.get_model_version_by_alias(wilds_model, "champion")
    assert champion.version == first["registered_model"]["version"] == "1"
    cfg = config.load(wilds)
    assert champion.tags[lineage.CONFIG_TAG] == lineage.config_digest(cfg)
    assert champion.tags[lineage.DATA_TAG] == lineage.data_digest(cfg)

    # 2. Nothing changed: nothing starts, no search folder, no MLflow run.
    before = sorted(p.name for p in (tmp_path / "results").iterdir())
    code, summaries = tune_all(capsys, "--changed", *configs)
    assert code == 0
    assert [s.get("unchanged") for s in summaries] == [True, True]
    assert summaries[0]["registered_model"] == {"name": wilds_model, "version": "1"}
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == before
    assert search_runs(client, wilds_model) == ["search-iwildcam"]

    # 3. One training image rewritten: iWildCam is searched again, with all of the budget.
    image = root / "iwildcam_v2.0" / "train" / "train_0000.jpg"
    Image.open(image).rotate(90).save(image, quality=90)
    code, (again, still) = tune_all(capsys, "--changed", "--budget", "1", *configs)
    assert code == 0
    assert "data changed" in again["changed"] and still["unchanged"] is True
    assert again["budget"]["worker_hours"] == 1.0
    decision = again["promotion"]
    assert decision["decision"] in ("promoted", "kept")
    assert (decision["champion_version"], decision["challenger_version"]) == ("1", "2")
    new_digest = lineage.data_digest(cfg)
    assert client.get_model_version(wilds_model, "2").tags[lineage.DATA_TAG] == new_digest
    assert search_runs(client, wilds_model) == ["search-iwildcam", "search-iwildcam-2"]

    # 4. status reads it all back from the server.
    assert cli.main(["status", "--json", *configs]) == 0
    entries = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["data_sets"]
    entry = entries[0]
    held = "2" if decision["decision"] == "promoted" else "1"
    assert entry["registered_model"] == wilds_model
    assert entry["champion"]["version"] == held
    assert entry["champion"]["data_digest"] == client.get_model_version(
        wilds_model, held).tags[lineage.DATA_TAG]
    assert entry["data_digest_now"] == new_digest
    assert entry["data_changed"] is (held == "1")  # v1 was trained before the rewrite
    assert entry["config_changed"] is False
    assert set(entry["champion"]["metrics"]) >= {"id_val/acc", "id_test/acc", "ood_test/acc"}
    assert entry["last_search"]["name"] == "search-iwildcam-2"
    assert entry["last_search"]["status"] == "FINISHED"
    assert entry["last_decision"]["version"] == "2"
    assert entry["last_decision"]["decision"] == decision["decision"]
    assert entries[1]["champion"]["version"] == "1" and entries[1]["data_changed"] is False
    assert cli.main(["status", *configs]) == 0
    table = capsys.readouterr().out
    assert wilds_model in table and f"v2 {decision['decision']}" in table
    # Without configs: every flyp-ray model of the server, its data unknown from here.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert cli.main(["status", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["data_sets"]
    by_name = {e["registered_model"]: e for e in listed}
    assert by_name[wilds_model]["champion"]["version"] == held
    assert by_name[wilds_model]["data_changed"] == "unknown"
    assert by_name[synthetic_model]["dataset"] == "synthetic"
    assert not any(name.endswith(".lock") for name in by_name)


def test_two_searches_of_one_model_at_once_end_with_the_better_as_champion(
        ray_session: None, mlflow_server: str, tmp_path: Path, wilds_root: Path) -> None:
    model = f"race-{uuid.uuid4().hex[:6]}"
    # Two searches of one data set and model that find different models: another learning
    # rate range each, and their own folders.
    ranges = {"low": (1.0e-5, 1.0e-4), "high": (1.0e-2, 1.0e-1)}
    cfgs = {}
    for label, (low, high) in ranges.items():
        folder = tmp_path / label
        folder.mkdir()
        space = {"lr": {"type": "float", "low": low, "high": high, "log": True}}
        cfgs[label] = config.load(wilds_config(folder, wilds_root, mlflow_server, model,
                                               space=space))
    # Each search in a process of its own, as compare runs its methods: side by side.
    task = ray.remote(num_cpus=0, max_retries=0, max_calls=1)(tune.run_search)
    summaries = ray.get([task.remote(cfg) for cfg in cfgs.values()])

    decisions = sorted((s["promotion"] for s in summaries),
                       key=lambda d: d["champion_version"] is not None)
    first, second = decisions
    # One at a time: the second decision saw the first one's champion.
    assert first["decision"] == "first"
    assert second["champion_version"] == first["challenger_version"]
    assert second["decision"] in ("promoted", "kept")
    client = MlflowClient(tracking_uri=mlflow_server)
    champion = client.get_model_version_by_alias(model, "champion").version
    # The better on one evaluation of both, made now on the same data.
    cfg = cfgs["low"]
    values = {v: registry.evaluate_model(cfg, f"models:/{model}/{v}")["id_val/acc"]
              for v in ("1", "2")}
    other = "1" if champion == "2" else "2"
    assert values[champion] >= values[other]
    if values[champion] == values[other]:  # a tie is no reason to move
        assert champion == first["challenger_version"]
    assert second["champion_value"] == pytest.approx(values[first["challenger_version"]])
