"""Data digests: a short fingerprint of what each split of a data set holds, cheap to recompute.

A run records which data it saw by these digests (MLflow dataset inputs, ``summary.json``'s
``data_digest``, the registered version's ``data_digest`` tag), and a search is re-run when its
data set's digest moves. So a digest must change when any image, label or split membership
changes, stay the same when nothing did, and cost little enough to compute on every start: no
pixel is read.

Per split, the digest hashes (SHA-256) the split's name, the class names, and for each item
that the runs read (after ``dataset.subsample``) its position, label and group, plus:

- an item that is a file of its own (ImageFolder, csv, WILDS, ImageNet, the transfer sets):
  its path relative to ``dataset.root``, its size and its modification time in nanoseconds
  (one ``stat``, no read);
- an item that is not (a Hugging Face split, the synthetic set, PatchCamelyon's h5 file): the
  loader's ``Source.fingerprint``: the ``datasets`` library's own fingerprint of the split's
  Arrow data with its files' names and sizes, the generator's parameters and code, the h5
  file's size and modification time.

The data set's digest hashes its kind and every split's digest. docs/DATASETS.md says what
this can and cannot notice. This module imports only the dataclasses at first: a search's
trial process unpickles a :class:`DataDigest` without loading the data code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flyp_ray.config import DatasetConfig
from flyp_ray.errors import DataError

if TYPE_CHECKING:
    import numpy as np

    from flyp_ray.data.base import Loaded, Source

DIGEST_CHARS = 16  # 64 bits: a short hex string for people, too long to collide by chance
_CHUNK = 4096  # items hashed per update: bounded memory on a million-file split
BUILT_IN_NAMES = ("synthetic",)  # kinds named after themselves rather than their folder


@dataclasses.dataclass(frozen=True)
class SplitDigest:
    """One split as the runs read it."""

    name: str  # train, id_val, ... (the split as runs name it)
    size: int  # items in the split
    digest: str  # hex; changes when any image, label or membership of this split changes


@dataclasses.dataclass(frozen=True)
class DataDigest:
    """A data set's version: a digest over every split, and each split's own."""

    digest: str  # over every split: the data set's version as a short hex string
    source: str  # the root folder, hub name, or "synthetic"
    splits: dict[str, SplitDigest]
    name: str = ""  # what people call it: the folder's or hub's name, or the built-in set's
    kind: str = ""  # dataset.name: imagefolder, huggingface, iwildcam, ...

    def as_json(self) -> dict[str, Any]:
        """Plain data, for summaries and logs."""
        return dataclasses.asdict(self)


def data_digest(cfg: DatasetConfig, source: str) -> DataDigest:
    """The digest of ``cfg``'s data set: lists its files as a run would, reads no image.

    A listed file that is gone is a :class:`DataError` naming it. A WILDS folder still to be
    downloaded (``dataset.download``) has no digest yet: an empty one is returned.
    """
    from flyp_ray.data import load  # the loaders: torch, PIL, open_clip's metadata, ...

    if load.pending_download(cfg, source):
        return DataDigest(digest="", source=str(cfg.root), splits={}, name=cfg.name,
                          kind=cfg.name)
    loaded = load.load_sources(cfg, source)
    where = _source_of(cfg, loaded)
    root = _root_prefix(cfg)
    splits = {name: split_digest(name, src, loaded.classnames, cfg.subsample, root)
              for name, src in loaded.sources.items()}
    return DataDigest(digest=combine(cfg.name, splits), source=where, splits=splits,
                      name=_display_name(cfg, where), kind=cfg.name)


def split_digest(name: str, src: Source, classnames: list[str], subsample: int | None,
                 root: str = "") -> SplitDigest:
    """The digest of split ``name`` as read from ``src`` (``subsample`` items at most).

    ``root`` is stripped from the front of file paths, so that a data set keeps its digest
    wherever it is mounted (as long as its files keep their modification times).
    """
    from flyp_ray.data.base import subsample_positions

    kept = subsample_positions(len(src.labels), subsample)
    hasher = hashlib.sha256()
    head = {"split": name, "classnames": classnames, "fingerprint": src.fingerprint,
            "grouped": src.groups is not None}
    hasher.update(json.dumps(head, sort_keys=True).encode())
    hasher.update(_int64(kept))
    hasher.update(_int64(src.labels[kept]))
    if src.groups is not None:
        hasher.update(_int64(src.groups[kept]))
    if src.path is not None:
        for start in range(0, len(kept), _CHUNK):
            hasher.update(_file_records(src, kept[start:start + _CHUNK], root))
    return SplitDigest(name=name, size=len(kept), digest=hasher.hexdigest()[:DIGEST_CHARS])


def combine(kind: str, splits: dict[str, SplitDigest]) -> str:
    """The data set's digest: its kind and every split's name, size and digest."""
    text = json.dumps({"kind": kind, "splits": [[s.name, s.size, s.digest] for s in
                                                sorted(splits.values(), key=lambda s: s.name)]})
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def _int64(values: np.ndarray) -> bytes:
    import numpy as np

    return np.ascontiguousarray(values, dtype="<i8").tobytes()


def _file_records(src: Source, positions: np.ndarray, root: str) -> bytes:
    """``path size mtime_ns`` per item, paths relative to ``root``; one stat each."""
    assert src.path is not None  # the caller checks
    lines = []
    for position in positions:
        path = str(src.path(int(position)))
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise DataError(f"image file listed but not found: {path}") from None
        relative = path[len(root):] if root and path.startswith(root) else path
        lines.append(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def _root_prefix(cfg: DatasetConfig) -> str:
    """``dataset.root`` as the loaders join it to file names, with its trailing separator."""
    if cfg.root is None:
        return ""
    return str(Path(cfg.root).expanduser()).rstrip(os.sep) + os.sep


def _source_of(cfg: DatasetConfig, loaded: Loaded) -> str:
    if cfg.name == "synthetic":
        return "synthetic"
    if cfg.name == "huggingface":
        return loaded.where  # the save_to_disk folder, or the hub name
    return str(Path(str(cfg.root)).expanduser().resolve())


def _display_name(cfg: DatasetConfig, where: str) -> str:
    """A user's own set is called by its folder's (or hub) name; a built-in one by its kind."""
    if cfg.name not in ("imagefolder", "huggingface", "csv"):
        return cfg.name
    path = Path(where)
    return where if cfg.name == "huggingface" and not path.is_absolute() else path.name
