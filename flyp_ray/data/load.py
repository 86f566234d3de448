"""Data sets as splits of ``(image, label, index)`` items, plus their class names and templates.

Several kinds of source, one shape of result (:class:`flyp_ray.data.base.Data`):

- ``iwildcam``, ``fmow``, ``camelyon17``: WILDS' own loader on the user's folder
  (:mod:`flyp_ray.data.wilds`).
- ``csv``: a metadata CSV and a class-name file: any image set (:mod:`flyp_ray.data.csv`).
- ``imagefolder``: ``root/<split>/<class>/<image>`` (:mod:`flyp_ray.data.imagefolder`).
- ``huggingface``: a ``datasets`` DatasetDict from ``save_to_disk``, or a hub name in the local
  cache (:mod:`flyp_ray.data.huggingface`).
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

from flyp_ray.config import SPLITS, DatasetConfig, cache_kind
from flyp_ray.data import (
    cache,
    csv,
    huggingface,
    imagefolder,
    imagenet,
    prompts,
    synthetic,
    transfer,
    wilds,
)
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
    plan = _cache_plan(cfg, train_transform, eval_transform, source)
    if plan is not None:
        splits = {name: _cached(split, loaded.sources[name], plan, cfg)
                  for name, split in splits.items()}
    return Data(classnames=loaded.classnames, templates=templates, splits=splits)


def _cache_plan(cfg: DatasetConfig, train_transform: Transform, eval_transform: Transform,
                source: str) -> cache.Plan | None:
    """How the splits are cached; None when they are not.

    ``auto`` is a speed-up the config did not ask for by name: where the model's transforms
    have a step the cache cannot run per batch, the images go uncached instead of the run
    stopping. ``memory`` or ``disk`` asked for by name is refused then (the plan's error).
    """
    if cache_kind(cfg) == "none":
        return None
    try:
        return cache.plan(train_transform, eval_transform, source)
    except ConfigError:
        if cfg.cache == "auto":
            return None
        raise


def _cached(split: Split, src: Source, plan: cache.Plan, cfg: DatasetConfig) -> Split:
    """``split`` with its items decoded once into uint8 pixels, augmented on the device."""
    base = split.dataset
    assert isinstance(base, ImageDataset)  # make_split builds one
    stored = ImageDataset(base.read, base.positions, base.labels, plan.store)
    if cache_kind(cfg) == "memory":
        store = cache.memory_store(len(stored), plan.size)
    else:
        # Everything that decides the pixels: a change in any of them is a new folder.
        key = cache.cache_key({"name": cfg.name, "root": cfg.root, "metadata": cfg.metadata,
                               "split": split.name, "transform": repr(plan.store),
                               "positions": _digest(base.positions),
                               "first": str(src.path(0)) if src.path and len(base) else "",
                               # a Hugging Face split saved again at the same root is new data
                               "fingerprint": src.fingerprint})
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
    if cfg.name in DECODED_AT_CHECK:
        decode_sample(loaded, cfg.subsample)
    sizes = ", ".join(f"{name} {len(src.labels)}" for name, src in loaded.sources.items())
    where = f"at {loaded.where}" if loaded.where else "(built in)"
    classes = len(loaded.classnames)
    line = f"{cfg.name} {where}: {len(loaded.sources)} splits ({sizes}), {classes} classes"
    line += "".join(f"; {note}" for note in loaded.notes)
    splits = {name: SplitFacts(size=len(subsample_positions(len(src.labels), cfg.subsample)),
                               grouped=src.groups is not None, official=src.official is not None)
              for name, src in loaded.sources.items()}
    return DataFacts(line, splits, classes, _per_class(loaded.sources.get("train"), cfg),
                     tuple(loaded.classnames))


# A user's own folder (an export, a scrape) may hold files that are not what their names say:
# a few images of each split are decoded before Ray starts, so that a wholesale problem (HEIC
# files named .jpg, a truncated copy) is refused with its path by validate, not a run.
DECODED_AT_CHECK = ("imagefolder", "huggingface")
DECODE_SAMPLE = 8  # images per split, spread over it


def decode_sample(loaded: Loaded, subsample: int | None) -> None:
    """Decode up to :data:`DECODE_SAMPLE` images of each split (those a run reads)."""
    for src in loaded.sources.values():
        kept = subsample_positions(len(src.labels), subsample)
        spread = np.linspace(0, len(kept) - 1, min(DECODE_SAMPLE, len(kept)))
        for pick in np.unique(spread.round().astype(np.int64)):
            src.read(int(kept[pick]))


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
    if cfg.name == "imagefolder":
        return imagefolder.load(cfg, source)
    if cfg.name == "huggingface":
        return huggingface.load(cfg, source)
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
