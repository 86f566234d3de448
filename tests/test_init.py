"""``flyp-ray init``: each layout found and read, the written file passes ``validate`` as it is,
and (slow, real Ray and MLflow) init -> validate -> train on a saved DatasetDict, and init ->
validate -> tune on an ImageFolder tree, whose every run (the search's, its trials', its
re-check's, which is ``train``'s own ``trainer.train``) records the data it saw.

The Ray runs are few and small (one epoch, 24 training images, one trial): about a minute and a
half here in all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import mlflow
import pytest
import yaml
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from flyp_ray import cli, config, init
from flyp_ray.data.base import DataFacts, SplitFacts
from flyp_ray.data.detect import Found
from flyp_ray.data.digest import data_digest
from flyp_ray.finetune.model import tiny_config_path
from flyp_ray.tracking import inputs
from tests.support.own_data import write_hub_cache, write_imagefolder, write_saved_dataset
from tests.support.wilds_folder import write_csv_dataset

TINY = [f"--set=model.arch={tiny_config_path()}", "--set=model.pretrained=null"]


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home and working folder of the test's own: the written config's ~/ storage and its
    sqlite:///mlflow.db land there."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def init_and_validate(capsys: pytest.CaptureFixture[str], data: str, out: Path,
                      *sets: str) -> dict[str, Any]:
    """init, then validate on the written file as it is. The tiny model stands in for the
    reference's ViT-B-16, whose weights no test machine may have (see the test of that case)."""
    code, stdout, err = run(capsys, "init", data, "--out", str(out), *TINY, *sets)
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["config"] == str(out)
    code, stdout, err = run(capsys, "validate", str(out))
    assert code == 0, err
    assert "config ok" in stdout
    return yaml.safe_load(out.read_text())


# --- each layout, no Ray -------------------------------------------------------------------


def test_imagefolder_written_file_passes_validate_as_it_is(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "my pets")
    raw = init_and_validate(capsys, str(root), tmp_path / "pets.yaml")
    assert raw["dataset"] == {"name": "imagefolder", "root": str(root), "templates": "simple",
                              "cache": "none", "loader_workers": -1}
    assert raw["model"] == {"arch": str(tiny_config_path()), "pretrained": None}
    assert raw["tracking"]["experiment"] == raw["tracking"]["registered_model"] == "flyp-my-pets"
    assert raw["train"]["batch_size"] <= 24 and raw["train"]["warmup_steps"] == 0  # few-shot
    text = (tmp_path / "pets.yaml").read_text()
    assert "# Classes (3): golden retriever, parrot, tabby cat" in text
    assert "# Splits: train 24, id_val 12, id_test 12" in text


def test_the_references_model_without_its_weights_is_named_and_refused_by_validate(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # An empty cache and no hub: what an air-gapped cluster (and every test machine) has.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = write_imagefolder(tmp_path / "pets")
    code, _, err = run(capsys, "init", str(root), "--out", str(tmp_path / "pets.yaml"))
    assert code == 0, err
    raw = yaml.safe_load((tmp_path / "pets.yaml").read_text())
    assert raw["model"] == {"arch": "ViT-B-16", "pretrained": "openai"}
    said = [line for line in err.splitlines() if "neither cached nor reachable" in line]
    assert len(said) == 1 and said[0].startswith("flyp-ray init: not decided: ")
    assert "validate refuses the file until then" in said[0]
    code, _, err = run(capsys, "validate", str(tmp_path / "pets.yaml"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "neither cached nor reachable" in err


def test_without_out_it_prints_the_yaml_and_says_what_it_found(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "pets", {"train": 3, "test": 1})
    code, out, err = run(capsys, "init", str(root), "--set", "lr=3e-5",
                         "--set", "dataset.subsample=6")
    assert code == 0, err
    raw = config.parse_yaml(out, "<stdout>")
    assert raw["train"]["lr"] == 3e-5 and raw["dataset"]["subsample"] == 6
    assert "id_val carved from train" in err
    assert "not decided: no ood_val/ood_test split" in err
    assert "this machine:" in err


def test_saved_dataset_hub_cache_wilds_and_csv(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path, wilds_root: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    saved = write_saved_dataset(tmp_path / "hfpets")
    raw = init_and_validate(capsys, str(saved), tmp_path / "hf.yaml")
    assert (raw["dataset"]["image_column"], raw["dataset"]["label_column"]) == ("img", "kind")
    write_hub_cache(tmp_path / "cache", "someorg/pets", tmp_path / "work")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    raw = init_and_validate(capsys, "someorg/pets", tmp_path / "hub.yaml")
    assert raw["dataset"]["root"] == "someorg/pets"
    assert raw["tracking"]["experiment"] == "flyp-someorg-pets"
    raw = init_and_validate(capsys, str(wilds_root / "iwildcam_v2.0"), tmp_path / "wilds.yaml")
    assert raw["dataset"] == {"name": "iwildcam", "root": str(wilds_root), "cache": "none",
                              "loader_workers": -1}
    assert "# Groups: yes" in (tmp_path / "wilds.yaml").read_text()
    csv_root = write_csv_dataset(tmp_path / "shapes", n_per_split=6)
    raw = init_and_validate(capsys, str(csv_root), tmp_path / "csv.yaml")
    assert raw["dataset"]["classnames"] == str(csv_root / "classnames.txt")


def test_what_init_cannot_read_is_one_line(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    for name in ("cats", "dogs"):
        (tmp_path / "flat" / name).mkdir(parents=True)
    (tmp_path / "taken.yaml").write_text("")
    root = write_imagefolder(tmp_path / "ok", {"train": 2, "val": 1})
    for argv, needle in (
            (["init", str(tmp_path / "flat")], "look like class folders: put them under train/"),
            (["init", str(tmp_path / "nothing")], "no such folder"),
            (["init", str(root), "--out", str(tmp_path / "taken.yaml")], "exists"),
            (["init", str(root), "--out", str(tmp_path / "no" / "x.yaml")], "no folder"),
            (["init", str(root), "--set", "train.epochs=0"], "train.epochs")):
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and needle in err, err


def facts(per_class: list[int], splits: tuple[str, ...] = ("train", "id_val")) -> Found:
    sizes = {s: SplitFacts(sum(per_class), False, False) for s in splits}
    return Found(dataset={"name": "imagefolder", "root": "/data/x"},
                 facts=DataFacts("line", sizes, len(per_class), dict(enumerate(per_class)),
                                 tuple(f"c{i}" for i in range(len(per_class)))), name="x")


GPU_NODE = init.Machine("this machine", gpus=4, node_gpus=4, node_cpus=32, cluster=False)
CPU_NODE = init.Machine("this machine", gpus=0, node_gpus=0, node_cpus=2, cluster=False)


@pytest.mark.parametrize(("per_class", "where", "expect"), [
    # ImageNet-sized: full batches, the fewest epochs, a node's GPUs per trial, fewer trials
    ([1270] * 1000, GPU_NODE, {"batch_size": 256, "epochs": 10, "warmup_steps": 500,
                               "workers": 4, "num_samples": 8, "max_concurrent_trials": 1}),
    # a transfer-sized set: full batches, many epochs for enough steps
    ([40] * 100, GPU_NODE, {"batch_size": 256, "epochs": 100, "warmup_steps": 150,
                            "workers": 1, "num_samples": 24, "max_concurrent_trials": 4}),
    # few-shot-like: the median class has 16 images; the whole set in one batch, no warm-up
    ([16] * 5 + [200], GPU_NODE, {"batch_size": 256, "epochs": 20, "warmup_steps": 0,
                                  "seeds": 3}),
    ([4] * 10, CPU_NODE, {"batch_size": 32, "epochs": 20, "precision": "fp32",
                          "cpus_per_worker": 1, "cache": "none", "max_concurrent_trials": 2}),
])
def test_sized_to_the_training_set_and_the_machine(per_class: list[int], where: init.Machine,
                                                    expect: dict[str, Any]) -> None:
    d = init.draft(facts(per_class), where)
    flat = {**d.raw["train"], **d.raw["resources"], **d.raw["search"], **d.raw["dataset"],
            "seeds": d.raw["search"]["recheck"]["seeds"]}
    assert {k: flat[k] for k in expect} == expect
    config.from_dict(config.parse_yaml(init.render(d.raw, d.comments, d.header), "x"), "x")


# --- init -> validate -> train, and a search: real Ray, real MLflow --------------------------


def small(tmp: Path, *more: str) -> list[str]:
    """--set items for a quick run on the test's 2-CPU Ray."""
    return ["--set=epochs=1", "--set=batch_size=8", "--set=train.eval_batch_size=64",
            "--set=resources.cpus_per_worker=0.5", "--set=resources.max_failures=0",
            f"--set=tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
            f"--set=storage={tmp / 'results'}", *more]


def recorded(uri: str, run_id: str) -> dict[str, str]:
    """The run's dataset inputs: context (the split) -> digest, read back with MlflowClient."""
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    return {next(t.value for t in i.tags if t.key == MLFLOW_DATASET_CONTEXT): i.dataset.digest
            for i in run.inputs.dataset_inputs}


def split_digests(path: Path) -> dict[str, str]:
    cfg = config.load(path)
    return {n: s.digest for n, s in data_digest(cfg.dataset, cfg.source).splits.items()}


@pytest.mark.slow
def test_saved_dataset_init_validate_train_through_the_disk_cache(
        ray_session: None, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    saved = write_saved_dataset(tmp_path / "hfpets")
    path = tmp_path / "hf.yaml"
    cache = tmp_path / "pixels"
    init_and_validate(capsys, str(saved), path, *small(tmp_path), "--set=dataset.cache=disk",
                      f"--set=dataset.cache_dir={cache}", "--set=dataset.loader_workers=1")
    code, out, err = run(capsys, "train", str(path))
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert recorded(uri, result["mlflow_run_id"]) == split_digests(path)
    # every image of every split was decoded once, by a loader process, into the cache
    filled = sorted(f.read_bytes() for f in cache.glob("*/filled.u8"))
    assert [len(f) for f in filled] == [12, 12, 24] and all(set(f) == {1} for f in filled)


@pytest.mark.slow
def test_a_search_records_its_data_on_every_run(ray_session: None,
                                                capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "pets")
    path = tmp_path / "pets.yaml"
    init_and_validate(capsys, str(root), path, *small(
        tmp_path, "--set=search.num_samples=1", "--set=search.max_concurrent_trials=1",
        "--set=search.recheck.seeds=1", "--set=search.recheck.top_k=1",
        "--set=search.space={lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}}"))
    code, out, err = run(capsys, "tune", str(path))
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    cfg = config.load(path)
    data = data_digest(cfg.dataset, cfg.source)
    assert summary["data_digest"] == data.digest
    uri = cfg.tracking.uri
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    kinds: dict[str, int] = {}
    for found in client.search_runs([experiment]):
        kind = found.data.tags["flyp_ray.kind"]
        kinds[kind] = kinds.get(kind, 0) + 1
        assert recorded(uri, found.info.run_id) == {n: s.digest for n, s in data.splits.items()}
        assert found.data.tags[inputs.DIGEST_TAG] == data.digest
    assert kinds == {"search": 1, "trial": 1, "recheck": 1}
    (rechecked,) = summary["recheck"][0]["runs"]
    assert 0.0 <= rechecked["metrics"]["id_val/acc"] <= 1.0
    version = summary["registered_model"]
    tags = client.get_model_version(version["name"], version["version"]).tags
    assert tags["data_digest"] == data.digest


@pytest.mark.slow
def test_resources_from_the_cluster_at_ray_address(ray_session: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    address = ray.get_runtime_context().gcs_address
    monkeypatch.setenv("RAY_ADDRESS", address)
    where = init.machine()
    assert where == init.Machine(f"the Ray cluster at {address}", gpus=0, node_gpus=0,
                                 node_cpus=2, cluster=False)
    assert ray.is_initialized()  # the session's Ray: joined, not shut down
