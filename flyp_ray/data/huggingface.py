"""``huggingface`` data sets: a ``datasets`` DatasetDict, read by the ``datasets`` library.

``dataset.root`` is either a folder written by ``DatasetDict.save_to_disk`` (read with
``datasets.load_from_disk``) or a hub name (``org/name``) read by ``datasets.load_dataset``
from the local cache only: nothing is fetched unless ``dataset.download`` is true, as for
WILDS (the library's offline mode, ``HF_HUB_OFFLINE``, is switched on for the call).

Columns: the image column is the one ``Image`` feature, the label column the one
``ClassLabel`` (whose names are the class names), unless ``dataset.image_column`` /
``dataset.label_column`` name them; a named label column may also hold integers, named by a
``dataset.classnames`` file. Splits are mapped as ImageFolder's folders are
(``train``; ``validation``/``valid``/``val`` -> ``id_val``; ``test`` -> ``id_test``; ``ood_val``,
``ood_test``); others are refused. Without a validation split, ``id_val`` is carved from
``train`` as for ImageFolder.

Loading reads labels only (an Arrow column, memory-mapped): the image column is read with
``Image(decode=False)`` and each image is decoded by :func:`flyp_ray.data.base.open_rgb` when a
loader process asks for it, so decoding runs in the DataLoader's processes and through the
decode-once cache (:mod:`flyp_ray.data.cache`) like every other kind. A split's
``fingerprint`` (for :mod:`flyp_ray.data.digest`) is the library's own fingerprint of its Arrow
data with the names and sizes of its Arrow files.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flyp_ray.config import SPLITS, DatasetConfig
from flyp_ray.data import prompts
from flyp_ray.data.base import Loaded, Source, one_line, open_rgb, own_splits
from flyp_ray.data.transfer import SPLIT_SEED, VAL_FRACTION, carve
from flyp_ray.errors import ConfigError, DataError

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # name or org/name, as the hub has


def is_saved(path: Path) -> bool:
    """Whether ``path`` is a folder that ``save_to_disk`` wrote (a DatasetDict or a Dataset)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def load(cfg: DatasetConfig, source: str) -> Loaded:
    """The splits of the DatasetDict at ``dataset.root``, labels read, no image decoded."""
    data, where = _open(cfg, source)
    image, label = _columns(cfg, data, where, source)
    ours = own_splits(list(data), lambda name: f"{where}: split {name!r}")
    classnames = _classnames(cfg, data[ours["train"]], label, source)
    sources = {split: _source(data[theirs], image, label, f"{where}[{theirs}]", len(classnames))
               for split, theirs in ours.items()}
    notes: tuple[str, ...] = ()
    if "id_val" not in sources:
        sources = _carve_id_val(sources)
        notes = (f"id_val carved from train ({VAL_FRACTION:.0%} of each class; no "
                 f"validation split)",)
    return Loaded(sources={s: sources[s] for s in SPLITS if s in sources},
                  classnames=classnames, where=where, notes=notes)


def columns(cfg: DatasetConfig, source: str) -> tuple[str, str]:
    """The image and label columns of the DatasetDict at ``dataset.root`` (``init`` writes
    them into the config it makes)."""
    data, where = _open(cfg, source)
    return _columns(cfg, data, where, source)


# --- opening -------------------------------------------------------------------------------


def _open(cfg: DatasetConfig, source: str) -> tuple[Any, str]:
    """The DatasetDict and where it came from (its folder, or its hub name)."""
    import datasets

    if cfg.root is None:
        raise ConfigError(source, "dataset.root", "is required for dataset huggingface (a "
                                                  "save_to_disk folder or a hub name), got None")
    path = Path(cfg.root).expanduser()
    if path.exists() or not HUB_NAME.match(cfg.root):
        if not is_saved(path):
            raise DataError(f"{source}: dataset.root: {path} is not a folder that "
                            f"DatasetDict.save_to_disk wrote (no dataset_dict.json)")
        try:
            data = datasets.load_from_disk(str(path))
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"{source}: dataset.root: cannot load {path} "
                            f"({one_line(err)})") from err
        where = str(path.resolve())
    else:
        data, where = _from_hub(cfg, source), cfg.root
    if not isinstance(data, datasets.DatasetDict):
        raise DataError(f"{source}: dataset.root: {where} holds one Dataset, not a DatasetDict: "
                        f"save DatasetDict({{'train': ..., 'validation': ...}}) instead")
    return data, where


def _from_hub(cfg: DatasetConfig, source: str) -> Any:
    import datasets

    name = str(cfg.root)
    # The library warns on every load from its cache that it did not ask the hub; every
    # worker of every trial would repeat it.
    datasets.logging.set_verbosity_error()
    try:
        with offline(not cfg.download):
            return datasets.load_dataset(name)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; all mean the same
        if cfg.download:
            raise DataError(f"{source}: dataset.root: cannot load {name!r} from the Hugging "
                            f"Face hub ({one_line(err)})") from err
        raise DataError(f"{source}: dataset.root: {name!r} is not a folder, nor a data set in "
                        f"the local Hugging Face cache ({datasets.config.HF_DATASETS_CACHE}); "
                        f"set dataset.download: true to fetch it ({one_line(err)})") from err


@contextlib.contextmanager
def offline(on: bool) -> Iterator[None]:
    """The ``datasets`` library's offline mode for the calls inside, when ``on``.

    ``HF_HUB_OFFLINE`` is read once, when the libraries are imported; their module constants
    are what every later call looks at, so they are set here for the duration.
    """
    import datasets.config
    import huggingface_hub.constants

    saved = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    if on:
        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


# --- columns and classes -------------------------------------------------------------------


def _columns(cfg: DatasetConfig, data: Any, where: str, source: str) -> tuple[str, str]:
    """The image and label columns: named in the config, or the one of their feature type."""
    import datasets

    features = next(iter(data.values())).features
    image = cfg.image_column or _only(features, datasets.Image, "image", "Image", where, source)
    label = cfg.label_column or _only(features, datasets.ClassLabel, "label", "ClassLabel",
                                      where, source)
    for key, column in (("dataset.image_column", image), ("dataset.label_column", label)):
        for split, dataset in data.items():
            if column not in dataset.features:
                raise ConfigError(source, key, f"split {split!r} of {where} has no column "
                                  f"{column!r} (it has {', '.join(dataset.features)})")
    if not isinstance(features[image], datasets.Image):
        raise ConfigError(source, "dataset.image_column", f"{image!r} of {where} is a "
                          f"{type(features[image]).__name__}, not an Image feature")
    return image, label


def _only(features: Any, kind: type, what: str, kind_name: str, where: str, source: str) -> str:
    found = [name for name, feature in features.items() if isinstance(feature, kind)]
    if len(found) != 1:
        have = f"{len(found)}: {', '.join(found)}" if found else "none"
        raise ConfigError(source, f"dataset.{what}_column", f"{where} needs one {kind_name} "
                          f"column to find the {what}s by, it has {have}; name it, got None")
    return str(found[0])


def _classnames(cfg: DatasetConfig, train: Any, label: str, source: str) -> list[str]:
    """The ClassLabel's names, or a ``dataset.classnames`` file's for an integer column."""
    import datasets

    feature = train.features[label]
    if isinstance(feature, datasets.ClassLabel):
        count = int(feature.num_classes)
        if cfg.classnames is not None:
            return prompts.classnames_for("huggingface", cfg.classnames, count, source)
        return [prompts_name(n) for n in feature.names]
    dtype = getattr(feature, "dtype", "")
    if not str(dtype).startswith(("int", "uint")):
        raise ConfigError(source, "dataset.label_column", f"{label!r} holds {dtype or feature}, "
                          f"not class indices (a ClassLabel, or integers with "
                          f"dataset.classnames); Dataset.class_encode_column makes one")
    return prompts.classnames_for("huggingface", cfg.classnames, None, source)


def prompts_name(name: str) -> str:
    """A ClassLabel name as a prompt says it: ``_`` and ``-`` are spaces, as for folders."""
    return " ".join(re.split(r"[_\-\s]+", str(name))).strip()


# --- splits --------------------------------------------------------------------------------


def _source(dataset: Any, image: str, label: str, where: str, classes: int) -> Source:
    import datasets

    labels = np.asarray(dataset.data.column(label).to_numpy(zero_copy_only=False))
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if len(bad):
        row = int(bad[0])
        raise DataError(f"{where}: row {row}: label must be in 0..{classes - 1}, got "
                        f"{labels[row]} (an unlabelled split? leave it out of the DatasetDict)")
    missing = dataset.data.column(image).null_count
    if missing:
        row = int(np.flatnonzero(dataset.data.column(image).is_null().to_numpy(False))[0])
        raise DataError(f"{where}: row {row}: no image ({missing} rows of column {image!r} "
                        f"are empty)")
    raw = dataset.select_columns([image]).cast_column(image, datasets.Image(decode=False))
    reader = RowReader(raw, image, where)
    return Source(read=reader, labels=labels.astype(np.int64), groups=None,
                  fingerprint=fingerprint(dataset))


def fingerprint(dataset: Any) -> str:
    """The library's fingerprint of a split, with its Arrow files' names and sizes."""
    files = [Path(f["filename"]) for f in dataset.cache_files]
    stats = ", ".join(f"{f.name} {os.path.getsize(f)}" for f in files if f.is_file())
    return f"{dataset._fingerprint} [{stats}]"  # the library's own field; no public accessor


def _carve_id_val(sources: dict[str, Source]) -> dict[str, Source]:
    train = sources["train"]
    assert isinstance(train.read, RowReader)  # _source builds one
    kept, held_out = carve(train.labels, (1 - VAL_FRACTION, VAL_FRACTION), SPLIT_SEED)
    return {**sources, "train": train.read.subset(kept, train),
            "id_val": train.read.subset(held_out, train)}


class RowReader:
    """Decodes one split's images from their stored bytes (or file paths), row by row."""

    def __init__(self, dataset: Any, column: str, where: str,
                 rows: np.ndarray | None = None) -> None:
        self.dataset = dataset  # the split with only the image column, not decoded
        self.column = column
        self.where = where  # for messages: "<folder or hub name>[<split>]"
        self.rows = rows  # a carved part: its rows in ``dataset``

    def __call__(self, position: int) -> Image.Image:
        row = position if self.rows is None else int(self.rows[position])
        stored = self.dataset[row][self.column]
        where = Path(f"{self.where}[{row}]")
        if stored.get("bytes"):
            return open_rgb(lambda: Image.open(io.BytesIO(stored["bytes"])), where)
        if stored.get("path"):
            return open_rgb(lambda: Image.open(stored["path"]), Path(stored["path"]))
        raise DataError(f"{where}: no image (neither bytes nor a path)")

    def subset(self, positions: np.ndarray, whole: Source) -> Source:
        """The rows at ``positions`` as a source of their own."""
        rows = positions if self.rows is None else self.rows[positions]
        reader = RowReader(self.dataset, self.column, self.where, rows)
        return Source(read=reader, labels=whole.labels[positions], groups=None,
                      fingerprint=f"{whole.fingerprint} rows "
                                  f"{hashlib.sha256(rows.tobytes()).hexdigest()[:16]}")
