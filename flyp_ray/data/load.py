"""Data sets as splits of ``(image, label, index)`` items, plus their class names and templates.

Several kinds of source, one shape of result (:class:`flyp_ray.data.base.Data`):

- ``iwildcam``, ``fmow``, ``camelyon17``: WILDS' own loader on the user's folder
  (:mod:`flyp_ray.data.wilds`).
- ``csv``: a metadata CSV and a class-name file: any image set (:mod:`flyp_ray.data.csv`).
- ``synthetic``: :mod:`flyp_ray.data.synthetic`, generated on the fly.
- ``imagenet``: ILSVRC-2012's class folders, with ImageNetV2, -R, -A, -Sketch and ObjectNet as
  ``ood_test/<set>`` splits (:mod:`flyp_ray.data.imagenet`).
- ``caltech101``, ``stanford_cars``, ``flowers102``, ``pcam``, ``rendered_sst2``: torchvision's
  classes on the user's files (:mod:`flyp_ray.data.transfer`), ``id_*`` splits only.

This module dispatches to the loader, subsamples and transforms each split, and puts the
decode-once cache (:mod:`flyp_ray.data.cache`) in front of it when the config asks.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from flyp_ray.config import SPLITS, DatasetConfig
from flyp_ray.data import cache, csv, imagenet, prompts, synthetic, transfer, wilds
from flyp_ray.data.base import (
    Data,
    DataFacts,
    ImageDataset,
    Loaded,
    Source,
    Split,
    SplitFacts,
    Transform,
    make_split,
    subsample_positions,
)
from flyp_ray.errors import ConfigError, DataError


def load_data(
    cfg: DatasetConfig, train_transform: Transform, eval_transform: Transform, source: str
) -> Data:
    """Load every split of ``cfg``'s data set.

    ``train`` items go through ``train_transform``, all other splits through ``eval_transform``.
    """
    templates = prompts.templates_for(cfg.templates, cfg.name, source)
    loaded = load_sources(cfg, source)
    splits = {}
    for name, src in loaded.sources.items():
        transform = train_transform if name == "train" else eval_transform
        splits[name] = make_split(name, src, transform, cfg.subsample)
    if cfg.cache != "none":
        plan = cache.plan(train_transform, eval_transform, source)
        splits = {name: _cached(split, loaded.sources[name], plan, cfg)
                  for name, split in splits.items()}
    return Data(classnames=loaded.classnames, templates=templates, splits=splits)


def _cached(split: Split, src: Source, plan: cache.Plan, cfg: DatasetConfig) -> Split:
    """``split`` with its items decoded once into uint8 pixels, augmented on the device."""
    base = split.dataset
    assert isinstance(base, ImageDataset)  # make_split builds one
    stored = ImageDataset(base.read, base.positions, base.labels, plan.store)
    if cfg.cache == "memory":
        store = cache.memory_store(len(stored), plan.size)
    else:
        # Everything that decides the pixels: a change in any of them is a new folder.
        key = cache.cache_key({"name": cfg.name, "root": cfg.root, "metadata": cfg.metadata,
                               "split": split.name, "transform": repr(plan.store),
                               "positions": _digest(base.positions),
                               "first": str(src.path(0)) if src.path and len(base) else ""})
        folder = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache.default_dir()
        store = cache.disk_store(folder, key, len(stored), plan.size)
    return dataclasses.replace(split, dataset=cache.CachedImages(stored, store),
                               prepare=plan.prepare(train=split.name == "train"))


def _digest(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()[:20]


def check_data(cfg: DatasetConfig, source: str) -> str:
    """Check the data set's root, layout and metadata, reading no images; describe it in a line.

    Also checks that the first image file of each split exists. Raises :class:`DataError`
    naming the expected path when something is missing.
    """
    return inspect_data(cfg, source).line


def inspect_data(cfg: DatasetConfig, source: str) -> DataFacts:
    """What :func:`check_data` checks, with the splits, sizes and classes a run will see."""
    prompts.templates_for(cfg.templates, cfg.name, source)
    pending = pending_download(cfg, source)
    if pending:
        return DataFacts(f"{cfg.name} at {pending}: not there yet, to be downloaded "
                         f"(dataset.download)", {}, 0, {})
    loaded = load_sources(cfg, source)
    for name, src in loaded.sources.items():
        if src.path is not None and len(src.labels) and not src.path(0).exists():
            raise DataError(f"{source}: dataset.root: first {name} image not found: {src.path(0)}")
    sizes = ", ".join(f"{name} {len(src.labels)}" for name, src in loaded.sources.items())
    where = f"at {loaded.where}" if loaded.where else "(built in)"
    classes = len(loaded.classnames)
    line = f"{cfg.name} {where}: {len(loaded.sources)} splits ({sizes}), {classes} classes"
    splits = {name: SplitFacts(size=len(subsample_positions(len(src.labels), cfg.subsample)),
                               grouped=src.groups is not None, official=src.official is not None)
              for name, src in loaded.sources.items()}
    return DataFacts(line, splits, classes, _per_class(loaded.sources.get("train"), cfg))


def pending_download(cfg: DatasetConfig, source: str) -> str:
    """Where a data set that ``dataset.download`` will fetch is still missing; "" if none is."""
    if cfg.name in wilds.SPECS and cfg.download:
        folder, missing = wilds.layout(cfg, source)
        return str(folder) if missing else ""
    return ""


def _per_class(train: Source | None, cfg: DatasetConfig) -> dict[int, int]:
    if train is None:
        return {}
    labels = train.labels[subsample_positions(len(train.labels), cfg.subsample)]
    values, counts = np.unique(labels, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def load_sources(cfg: DatasetConfig, source: str) -> Loaded:
    """The loader's view of ``cfg``'s data set: one source per split, none subsampled yet."""
    if cfg.name in wilds.SPECS:
        return wilds.load(cfg, source)
    if cfg.name == "csv":
        return csv.load(cfg, source)
    if cfg.name == "synthetic":
        return _load_synthetic(cfg, source)
    if cfg.name == "imagenet":
        return imagenet.load(cfg, source)
    if cfg.name in transfer.NAMES:
        return transfer.load(cfg, source)
    raise ConfigError(source, "dataset.name", f"unknown data set {cfg.name!r}")


def _load_synthetic(cfg: DatasetConfig, source: str) -> Loaded:
    count = len(synthetic.CLASSNAMES)
    classnames = prompts.classnames_for("synthetic", cfg.classnames, count, source)
    sources = {}
    for name in SPLITS:
        split = synthetic.ShapesSplit(name)
        sources[name] = Source(read=split.image, labels=split.labels(), groups=split.groups(),
                               fingerprint=synthetic.fingerprint(split))
    return Loaded(sources=sources, classnames=classnames, where="")
