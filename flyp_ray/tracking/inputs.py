"""Which data each run saw: MLflow dataset inputs, one per split, with its digest.

MLflow's UI shows a run's inputs in its "Dataset" column as ``name (digest)`` with the input's
``mlflow.data.context`` tag beside it; here the name is the data set's (its folder or hub name,
or the built-in set's), the digest the split's (:mod:`flyp_ray.data.digest`) and the context
the split (``train``, ``id_val``, ...). Each input also carries the data set's own digest
(``flyp_ray.data_digest``) and the split's size, and the run gets the tag
``flyp_ray.data_digest``. The datasets are ``mlflow.data.meta_dataset.MetaDataset``s (MLflow's
class for data that is not loaded whole) whose source is the folder, the hub name
(``HuggingFaceDatasetSource``) or the generator (``CodeDatasetSource``).

The digest is computed once, by the driver of a command (:func:`measure`), and handed to the
runs it starts: a search's trials and re-checks never list the data again.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from flyp_ray.tracking import runs

if TYPE_CHECKING:
    from flyp_ray.config import Config
    from flyp_ray.data.digest import DataDigest

log = logging.getLogger(__name__)

DIGEST_TAG = "flyp_ray.data_digest"  # on runs and inputs: the data set's digest
SIZE_TAG = "flyp_ray.size"  # on inputs: the split's items (after dataset.subsample)


def measure(cfg: Config) -> DataDigest:
    """The digest of ``cfg``'s data set, computed here (the command's driver), logged once."""
    from flyp_ray.data.digest import data_digest

    data = data_digest(cfg.dataset, cfg.source)
    if data.digest:
        sizes = ", ".join(f"{s.name} {s.digest}" for s in data.splits.values())
        log.info("data %s %s (%s)", data.name, data.digest, sizes)
    return data


def dataset_inputs(data: DataDigest) -> list[DatasetInput]:
    """One MLflow dataset input per split of ``data``, its context the split."""
    source = _source(data)
    found = []
    for split in data.splits.values():
        # (MLflow's stubs leave MetaDataset's profile abstract; the class is concrete)
        meta = MetaDataset(source, name=data.name,  # type: ignore[abstract]
                           digest=split.digest).to_dict()
        entity = Dataset(name=meta["name"], digest=meta["digest"],
                         source_type=meta["source_type"], source=meta["source"])
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, split.name), InputTag(SIZE_TAG, str(split.size)),
                InputTag(DIGEST_TAG, data.digest)]
        found.append(DatasetInput(entity, tags))
    return found


def log_data(uri: str, run_id: str, data: DataDigest | None) -> None:
    """Record ``data`` as the run's dataset inputs and tag; never raises (logged instead)."""
    if data is None or not data.splits:
        return
    try:
        MlflowClient(tracking_uri=uri).log_inputs(run_id, datasets=dataset_inputs(data))
    except Exception as err:  # noqa: BLE001 - a tracking failure must not stop a run
        log.warning("MLflow log_inputs failed for run %s (%s: %s)", run_id,
                    type(err).__name__, str(err)[:200])
    runs.set_tags(uri, run_id, {DIGEST_TAG: data.digest})


def version_tags(data: DataDigest | None) -> dict[str, str]:
    """A registered model version's tag of the data it was trained on: ``data_digest``."""
    return {"data_digest": data.digest} if data is not None and data.digest else {}


def _source(data: DataDigest) -> DatasetSource:
    if data.kind == "synthetic":
        return CodeDatasetSource({"generator": "flyp_ray.data.synthetic"})
    if data.kind == "huggingface" and not Path(data.source).is_absolute():
        return HuggingFaceDatasetSource(path=data.source)
    with warnings.catch_warnings():
        # A local path resolves to MLflow's local-file source under two registered schemes
        # ("" and "file"); MLflow warns that it picked one, which is the same class either way.
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(data.source)
