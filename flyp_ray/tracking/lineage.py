"""What a registered model was made from: the digests of its data and of its training config.

A search's registered version carries both as tags, ``data_digest`` (:mod:`flyp_ray.data.digest`)
and ``config_digest`` (:func:`config_digest`). ``flyp-ray tune-all --changed`` compares the
champion's with the current ones to tell which data sets need a new search, and
``flyp-ray status`` shows whether the data moved since the champion was trained.

The config digest covers what decides the result of a search: the data set's settings, the
model, the training settings and the search (space, metric, sampler and its seed, number of
trials, scheduler, re-check). It leaves out where and how fast the search runs, so that a nightly
job on a cluster (other paths, more workers, a share of a budget) finds the same digest as the
laptop that wrote the config: ``tracking`` (promotion included), ``storage``, ``resources``,
the data set's folders and loader settings, and the training settings that change speed or logs
but not the model (each listed below).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from flyp_ray.config import Config, resolve_recipe, to_dict
from flyp_ray.errors import FlypRayError

log = logging.getLogger(__name__)

DATA_TAG = "data_digest"
CONFIG_TAG = "config_digest"
DIGEST_CHARS = 16  # as the data digest: 64 bits in hex
# Where the data is and how it is read (the data digest speaks for its content).
DATASET_PLACEMENT = ("root", "classnames", "metadata", "download", "loader_workers", "cache",
                     "cache_dir", "ood_root")
# Speed and logging: the same model either way (the speed options' tests hold the loss equal).
TRAIN_PLACEMENT = ("eval_batch_size", "grad_checkpointing", "compile", "log_every_steps",
                   "local_loss")
# How many trials run at once, and a budget (tune-all --budget shares one out differently as
# the set of data sets that run changes).
SEARCH_PLACEMENT = ("max_concurrent_trials", "budget")


def config_digest(cfg: Config) -> str:
    """A short hex digest of the settings that decide a search's result (see the module)."""
    raw = to_dict(cfg)
    relevant = {
        "dataset": {k: v for k, v in raw["dataset"].items() if k not in DATASET_PLACEMENT},
        "model": {"arch": _file_or_name(cfg.model.arch, read=True),
                  "pretrained": _file_or_name(cfg.model.pretrained, read=False)},
        "train": {k: v for k, v in dataclasses.asdict(resolve_recipe(cfg.train)).items()
                  if k not in TRAIN_PLACEMENT},
        "search": {k: v for k, v in raw["search"].items() if k not in SEARCH_PLACEMENT},
    }
    text = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def _file_or_name(value: str | None, *, read: bool) -> Any:
    """A name as it is; a file by what it holds, wherever it lies: a model-config JSON by its
    content, a checkpoint (too large to hash on every start) by its name and size."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        return value
    if read:
        return json.loads(path.read_text())
    return {"file": path.name, "bytes": path.stat().st_size}


def data_digest(cfg: Config) -> str | None:
    """The data set's digest now; None where its data cannot be read from here (said why)."""
    from flyp_ray.data.digest import data_digest as digest_of

    try:
        return digest_of(cfg.dataset, cfg.source).digest or None
    except (FlypRayError, OSError) as err:
        log.warning("%s: no data digest: %s", cfg.source, str(err).splitlines()[0][:300])
        return None


def tags(cfg: Config, data: str | None = None) -> dict[str, str]:
    """The registered version's tags: ``config_digest`` and, where it can be had,
    ``data_digest`` (``data`` when the caller took it already, at the start of its search)."""
    out = {CONFIG_TAG: config_digest(cfg)}
    data = data or data_digest(cfg)
    if data is not None:
        out[DATA_TAG] = data
    return out


# --- against the champion --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Since:
    """The champion of a config's registered model against the config and data of now."""

    name: str | None  # the registered model (None: the config registers none)
    champion: ModelVersion | None  # None: no champion yet
    data_digest: str | None  # now; None: the data cannot be read from here
    config_digest: str  # now

    @property
    def data_changed(self) -> bool | None:
        """Whether the data moved since the champion was trained; None: cannot tell."""
        then = self.champion.tags.get(DATA_TAG) if self.champion is not None else None
        if then is None or self.data_digest is None:
            return None
        return then != self.data_digest

    @property
    def config_changed(self) -> bool | None:
        """Whether the training-relevant config moved; None: the champion does not say."""
        then = self.champion.tags.get(CONFIG_TAG) if self.champion is not None else None
        return None if then is None else then != self.config_digest

    def reason(self) -> str | None:
        """Why a new search is due (None: nothing changed since the champion was made)."""
        if self.name is None:
            return "no tracking.registered_model to compare with"
        if self.champion is None:
            return f"{self.name} has no champion yet"
        version = f"champion version {self.champion.version}"
        if self.data_changed is None:
            return (f"the data digest of {version} or of the data now is unknown "
                    f"({self.champion.tags.get(DATA_TAG) or 'not recorded'} / "
                    f"{self.data_digest or 'unreadable'})")
        if self.data_changed:
            return (f"the data changed since {version} "
                    f"({self.champion.tags[DATA_TAG]} -> {self.data_digest})")
        if self.config_changed is None:
            return f"{version} records no config digest"
        if self.config_changed:
            return (f"the training config changed since {version} "
                    f"({self.champion.tags[CONFIG_TAG]} -> {self.config_digest})")
        return None


def since_champion(cfg: Config, *, read_data: bool = True) -> Since:
    """The config's champion and the digests of now (the data's only with ``read_data``)."""
    name = cfg.tracking.registered_model
    champion = champion_version(cfg.tracking.uri, name) if name else None
    data = data_digest(cfg) if read_data else None
    return Since(name, champion, data, config_digest(cfg))


def champion_version(uri: str, name: str) -> ModelVersion | None:
    """The version the alias ``champion`` names, or None (no such model or alias, or a sqlite
    store that does not exist yet: nothing is created to find out)."""
    from flyp_ray.tracking import runs
    from flyp_ray.tracking.registry import CHAMPION

    if not runs.store_exists(uri):
        return None
    try:
        return runs.client(uri).get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
