"""What every loader shares: a split, a loaded data set, and the readers of its images.

A loader (:mod:`.wilds`, :mod:`.csv`, :mod:`.imagenet`, :mod:`.transfer`, the synthetic set)
turns a data set's files into :class:`Loaded`, one :class:`Source` per split;
:mod:`flyp_ray.data.load` subsamples, transforms and caches them into :class:`Data`, whose
splits hold ``(image, label, index)`` items. The ``index`` of an item is its position in its
split (after subsampling); evaluation hands those indices back to ``Split.official_eval``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from flyp_ray.config import DatasetConfig
from flyp_ray.errors import ConfigError, DataError

Transform = Callable[[Image.Image], Any]
OfficialEval = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, float]]

SUBSAMPLE_SEED = 0  # fixed, so that a subsampled split is the same in every trial and worker


@dataclasses.dataclass(frozen=True)
class Split:
    """One split, ready for a DataLoader."""

    name: str  # one of config.SPLITS, or ood_test/<set> for one of ImageNet's shift sets
    dataset: torch.utils.data.Dataset  # item: (image after transform, label: int, index: int)
    labels: torch.Tensor  # int64 [N], the label of each item
    groups: torch.Tensor | None  # int64 [N] group id of each item, None if the data set has none
    # (y_pred, y_true, indices into this split) -> WILDS' own dataset.eval results (floats);
    # None if not WILDS
    official_eval: OfficialEval | None
    # Run on each batch after its copy to the device; set when the items are cached uint8
    # pixels (dataset.cache), None when they are ready as they come.
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None
    # int64 [model classes]: the split's class of each model class, -1 for classes it lacks;
    # labels are the split's classes. Evaluation takes each split class's highest logit
    # (ImageNet-R/A: a 200-class subset; ObjectNet: several ImageNet classes per class).
    # None: labels are model classes.
    class_map: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class Data:
    """A loaded data set: what the prompts say and what the images are."""

    classnames: list[str]
    templates: list[str]
    splits: dict[str, Split]  # in SPLITS order, only those the data set has


class ImageDataset(torch.utils.data.Dataset[tuple[Any, int, int]]):
    """Items ``(transform(image), label, index)``, ``index`` being the item's position here."""

    def __init__(
        self,
        read: Callable[[int], Image.Image],
        positions: np.ndarray,
        labels: torch.Tensor,
        transform: Transform,
    ) -> None:
        self.read = read
        self.positions = positions
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image = self.read(int(self.positions[index]))
        return self.transform(image), int(self.labels[index]), index


@dataclasses.dataclass(frozen=True)
class SplitFacts:
    """What a config check needs to know of one split, without reading an image."""

    size: int  # items after subsampling
    grouped: bool  # has groups: worst_group_acc is reported
    official: bool  # has WILDS' official metrics: {split}/official/... are reported


@dataclasses.dataclass(frozen=True)
class DataFacts:
    """A data set as ``check_data`` found it: the line it prints and what runs will see."""

    line: str
    splits: dict[str, SplitFacts]  # empty while the data set is still to be downloaded
    classes: int
    train_per_class: dict[int, int]  # training images of each class present (subsampled)


@dataclasses.dataclass(frozen=True)
class Source:
    """One split as its loader found it, before subsampling and transforms."""

    read: Callable[[int], Image.Image]  # position -> RGB image
    labels: np.ndarray  # int64
    groups: np.ndarray | None  # int64
    path: Callable[[int], Path] | None = None  # position -> image file, for file-backed sources
    # kept positions -> WILDS' official metrics of those items (Split.official_eval); None if
    # the data set has none
    official: Callable[[np.ndarray], OfficialEval] | None = None
    class_map: torch.Tensor | None = None  # becomes Split.class_map
    # What identifies the content of items that are not one file each (a Hugging Face split's
    # fingerprint, a generator's parameters, an h5 file's stat), for the data digest
    # (:mod:`flyp_ray.data.digest`); file-backed items are identified through ``path``.
    fingerprint: str = ""


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What a loader found: one source per split, and the class names."""

    sources: dict[str, Source]
    classnames: list[str]
    where: str  # for messages: the folder or file the data came from; "" when built in



def make_split(name: str, src: Source, transform: Transform, subsample: int | None) -> Split:
    """``src`` as a split: subsampled (``subsample`` items at most) and transformed."""
    kept = subsample_positions(len(src.labels), subsample)
    labels = torch.as_tensor(src.labels[kept], dtype=torch.int64)
    groups = None if src.groups is None else torch.as_tensor(src.groups[kept], dtype=torch.int64)
    official = src.official(kept) if src.official is not None else None
    return Split(name=name, dataset=ImageDataset(src.read, kept, labels, transform), labels=labels,
                 groups=groups, official_eval=official, class_map=src.class_map)


def subsample_positions(n: int, limit: int | None) -> np.ndarray:
    """At most ``limit`` of ``range(n)``: a sorted random subset, the same on every call."""
    if limit is None or n <= limit:
        return np.arange(n)
    rng = np.random.default_rng(SUBSAMPLE_SEED)
    return np.sort(rng.choice(n, size=limit, replace=False))


# --- images --------------------------------------------------------------------------------


def one_line(err: BaseException) -> str:
    """An error as ``Type: first line``, for messages that name a file."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def open_rgb(open_image: Callable[[], Image.Image], path: Path) -> Image.Image:
    """Open and decode an image now, so that a broken file fails here with its name."""
    try:
        image = open_image()
        image.load()  # PIL opens lazily; decode errors would otherwise surface in a transform
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path} ({one_line(err)})") from err


class FileReader:
    """Reads the images of a file list (a csv data set)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __call__(self, position: int) -> Image.Image:
        path = self.paths[position]
        return open_rgb(lambda: Image.open(path), path)

    def path(self, position: int) -> Path:
        return self.paths[position]


def dataset_root(cfg: DatasetConfig, source: str) -> Path:
    """``dataset.root`` as a path; a ConfigError if the config has none."""
    if cfg.root is None:
        raise ConfigError(source, "dataset.root", f"is required for dataset {cfg.name}, got None")
    return Path(cfg.root).expanduser()
