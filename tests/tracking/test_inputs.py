"""Dataset inputs as MLflow records them and its UI reads them back: one per split, the data
set's name, the split's digest, the split as context (real MLflow, a sqlite store)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from flyp_ray.config import DatasetConfig
from flyp_ray.data.digest import DataDigest, SplitDigest, data_digest
from flyp_ray.tracking import inputs
from tests.support.own_data import write_imagefolder

Store = tuple[str, MlflowClient, str]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """One sqlite store for the module (creating one takes seconds): URI, client, experiment."""
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    return uri, client, client.create_experiment("inputs", artifact_location=(tmp / "a").as_uri())


def new_run(store: Store) -> tuple[str, MlflowClient, str]:
    uri, client, experiment = store
    return uri, client, client.create_run(experiment).info.run_id


def read_back(client: MlflowClient, run_id: str) -> dict[str, tuple[str, str, str, dict]]:
    """context -> (name, digest, source type, input tags)."""
    found = {}
    for entry in client.get_run(run_id).inputs.dataset_inputs:
        tags = {t.key: t.value for t in entry.tags}
        found[tags[MLFLOW_DATASET_CONTEXT]] = (entry.dataset.name, entry.dataset.digest,
                                               entry.dataset.source_type, tags)
    return found


def test_one_input_per_split_with_name_digest_and_context(tmp_path: Path, store: Store) -> None:
    root = write_imagefolder(tmp_path / "pets")
    data = data_digest(DatasetConfig(name="imagefolder", root=str(root)), "x.yaml")
    uri, client, run_id = new_run(store)
    inputs.log_data(uri, run_id, data)
    inputs.log_data(uri, run_id, data)  # a restarted driver logs again: no duplicates
    found = read_back(client, run_id)
    assert set(found) == {"train", "id_val", "id_test"}
    for split, (name, digest, source_type, tags) in found.items():
        assert (name, digest, source_type) == ("pets", data.splits[split].digest, "local")
        assert tags[inputs.DIGEST_TAG] == data.digest
        assert tags[inputs.SIZE_TAG] == str(data.splits[split].size)
    entry = client.get_run(run_id).inputs.dataset_inputs[0].dataset
    assert json.loads(entry.source) == {"uri": str(root.resolve())}
    assert client.get_run(run_id).data.tags[inputs.DIGEST_TAG] == data.digest


@pytest.mark.parametrize(("kind", "source", "source_type"),
                         [("huggingface", "someorg/pets", "hugging_face"),
                          ("synthetic", "synthetic", "code")])
def test_hub_and_built_in_sources(store: Store, kind: str, source: str, source_type: str) -> None:
    data = DataDigest(digest="0123456789abcdef", source=source, name=source, kind=kind,
                      splits={"train": SplitDigest("train", 5, "fedcba9876543210")})
    uri, client, run_id = new_run(store)
    inputs.log_data(uri, run_id, data)
    assert read_back(client, run_id)["train"][:3] == (source, "fedcba9876543210", source_type)


def test_no_digest_no_inputs(store: Store) -> None:
    uri, client, run_id = new_run(store)
    inputs.log_data(uri, run_id, DataDigest(digest="", source="/x", splits={}))
    assert client.get_run(run_id).inputs.dataset_inputs == []
