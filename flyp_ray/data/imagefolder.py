"""``imagefolder`` data sets: ``<root>/<split>/<class>/<image>``, a folder per class, as
torchvision's ``ImageFolder`` reads them and most exports, tutorials and labelling tools write.

Split folders: ``train``; ``val``, ``valid`` or ``validation`` (``id_val``); ``test``
(``id_test``); ``ood_val`` and ``ood_test``. Any other folder under ``root`` is refused with
those names (files there, a README or a class list, are left alone). The classes are the
class folders of ``train`` in sorted order (torchvision's order); a class is named after its
folder, ``_`` and ``-`` read as spaces (``golden_retriever`` -> "golden retriever"), unless
``dataset.classnames`` names them.

What a user's folder holds, case by case (docs/DATASETS.md says the same):

- a class missing from an evaluation split, or its folder there empty: allowed, said in the
  line ``validate`` prints; a split rarely has every class;
- a class folder in an evaluation split that ``train`` does not have: refused with its path
  (a misspelt folder would otherwise be a class the model never trained on);
- an empty class folder in ``train``: refused with its path (a class needs training images);
- a file that is not an image (by its suffix, torchvision's list): skipped, with a count and
  an example in that line; hidden files (``.DS_Store``, ``._x.jpg``) are skipped silently;
- an image directly in a split folder, in no class folder: refused with its path (it has no
  label);
- an image that cannot be decoded: ``validate`` decodes a few images of each split
  (:func:`flyp_ray.data.load.inspect_data`) and refuses the first bad one with its path; one it
  did not try stops the run with the same one-line error when a loader reaches it.

Without a validation folder, ``id_val`` is carved from ``train``: 20% of each class, drawn
with a fixed seed (as for the transfer sets), the same on every machine. Listing reads no image:
one ``scandir`` per folder. torchvision's ``make_dataset`` lists the same files but keeps one
tuple per file and says nothing of what it skipped; here names pack into one bytes object.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from flyp_ray.config import SPLITS, DatasetConfig, did_you_mean
from flyp_ray.data import prompts
from flyp_ray.data.base import (
    FileList,
    Loaded,
    Source,
    dataset_root,
    open_rgb,
    own_splits,
)
from flyp_ray.data.transfer import SPLIT_SEED, VAL_FRACTION, carve
from flyp_ray.errors import ConfigError, DataError

# torchvision's ImageFolder IMG_EXTENSIONS: what its users' folders are known to hold
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff",
                            ".webp"})


@dataclasses.dataclass
class SplitListing:
    """One split folder as listed: its class folders' images, and what was not used."""

    folder: Path
    classes: dict[str, list[str]]  # class folder -> its images, relative to it, sorted
    skipped: list[Path] = dataclasses.field(default_factory=list)  # files that are no images
    loose: list[Path] = dataclasses.field(default_factory=list)  # images in no class folder

    @property
    def count(self) -> int:
        return sum(len(files) for files in self.classes.values())


def class_name(folder: str) -> str:
    """A class folder's name as a prompt says it: ``_`` and ``-`` are spaces."""
    return " ".join(re.split(r"[_\-\s]+", folder)).strip()


def split_folders(root: Path, source: str) -> dict[str, Path]:
    """Our split -> its folder under ``root``; refuses other folders, and a root without
    ``train``."""
    if not root.is_dir():
        raise DataError(f"{source}: dataset.root: folder not found: {root}")
    with os.scandir(root) as entries:
        names = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    try:
        ours = own_splits(names, lambda name: f"{root / name}/")
    except DataError as err:
        raise DataError(f"{source}: dataset.root: {err}{_hint(root, names)}") from None
    return {split: root / name for split, name in ours.items()}


def _hint(root: Path, names: list[str]) -> str:
    """A root of class folders without split folders is the commonest mistake: say so."""
    if "train" in names or not names:
        return ""
    return f"; class folders go under {root / 'train'}/ (and val/, test/)"


def list_split(folder: Path) -> SplitListing:
    """The class folders of a split folder with their images, sorted; reads no image."""
    listing = SplitListing(folder, {})
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                listing.classes[entry.name] = sorted(_images(Path(entry.path), "", listing))
            elif _is_image(entry.name):
                listing.loose.append(Path(entry.path))
            else:
                listing.skipped.append(Path(entry.path))
    return listing


def _images(folder: Path, prefix: str, listing: SplitListing) -> list[str]:
    """Image files under ``folder``, subfolders included (as torchvision walks them)."""
    found: list[str] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                found += _images(Path(entry.path), f"{prefix}{entry.name}/", listing)
            elif _is_image(entry.name):
                found.append(prefix + entry.name)
            else:
                listing.skipped.append(Path(entry.path))
    return found


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def load(cfg: DatasetConfig, source: str) -> Loaded:
    """Every split folder of ``dataset.root`` as file lists (no image read)."""
    root = dataset_root(cfg, source)
    listings = {split: list_split(folder) for split, folder in split_folders(root, source).items()}
    classes = _classes(listings["train"], source)
    notes = []
    for split, listing in listings.items():
        _refuse_loose(listing, source)
        if split != "train":
            _refuse_unknown(listing, classes, listings["train"].folder, source)
    sources = {}
    for split, listing in listings.items():
        if listing.count == 0 and split != "train":
            notes.append(f"{listing.folder.name}/ holds no images: no {split} split")
            continue
        sources[split] = _source(listing, classes)
        missing = [c for c in classes if not listing.classes.get(c)]
        if missing:
            notes.append(f"{split} has no images of {len(missing)} class(es) "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if "id_val" not in sources:
        sources = _carve_id_val(sources)
        notes.append(f"id_val carved from train ({VAL_FRACTION:.0%} of each class; no "
                     f"val/ folder)")
    skipped = [path for listing in listings.values() for path in listing.skipped]
    if skipped:
        notes.append(f"skipped {len(skipped)} file(s) that are not images (e.g. {skipped[0]})")
    return Loaded(sources={s: sources[s] for s in _ordered(sources)},
                  classnames=_classnames(cfg, classes, source), where=str(root),
                  notes=tuple(notes))


def _classes(train: SplitListing, source: str) -> list[str]:
    """The class folders of ``train``, sorted; each must hold images."""
    if not train.classes:
        raise DataError(f"{source}: dataset.root: {train.folder}/ has no class folders "
                        f"(expected {train.folder}/<class>/<image>)")
    empty = [name for name, files in train.classes.items() if not files]
    if empty:
        raise DataError(f"{source}: dataset.root: {train.folder / empty[0]}/ holds no images "
                        f"(a class needs training images; remove the folder to drop it)")
    return list(train.classes)


def _refuse_loose(listing: SplitListing, source: str) -> None:
    if listing.loose:
        raise DataError(f"{source}: dataset.root: {listing.loose[0]} is in no class folder, so "
                        f"it has no label (expected {listing.folder}/<class>/<image>)")


def _refuse_unknown(listing: SplitListing, classes: list[str], train: Path, source: str) -> None:
    unknown = [name for name, files in listing.classes.items() if name not in classes and files]
    if unknown:
        raise DataError(f"{source}: dataset.root: {listing.folder / unknown[0]}/ is a class that "
                        f"{train}/ does not have{did_you_mean(unknown[0], classes)}")


def _source(listing: SplitListing, classes: list[str]) -> Source:
    names: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = listing.classes.get(name, [])
        names += [f"{name}/{f}" for f in files]
        labels += [label] * len(files)
    reader = FileListReader(FileList(listing.folder, names))
    return Source(read=reader, labels=np.asarray(labels, dtype=np.int64), groups=None,
                  path=reader.path)


def _carve_id_val(sources: dict[str, Source]) -> dict[str, Source]:
    """``train`` split in two, class by class: the same images on every machine."""
    train = sources["train"]
    kept, held_out = carve(train.labels, (1 - VAL_FRACTION, VAL_FRACTION), SPLIT_SEED)
    assert isinstance(train.read, FileListReader)  # _source builds one
    return {**sources, "train": train.read.subset(kept, train.labels),
            "id_val": train.read.subset(held_out, train.labels)}


def _ordered(sources: dict[str, Source]) -> list[str]:
    return [s for s in SPLITS if s in sources]


def _classnames(cfg: DatasetConfig, classes: list[str], source: str) -> list[str]:
    if cfg.classnames is not None:
        return prompts.classnames_for("imagefolder", cfg.classnames, len(classes), source)
    names = [class_name(c) for c in classes]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        folders = [c for c in classes if class_name(c) == repeated[0]]
        raise ConfigError(source, "dataset.classnames", f"class folders {', '.join(folders)} "
                          f"both read as {repeated[0]!r}; rename one, or name the classes in a "
                          f"file")
    return names


class FileListReader:
    """Reads the images of a :class:`FileList`."""

    def __init__(self, files: FileList, positions: np.ndarray | None = None) -> None:
        self.files = files
        self.positions = positions  # a carved part: its positions in ``files``

    def __call__(self, position: int) -> Image.Image:
        path = self.path(position)
        return open_rgb(lambda: Image.open(path), path)

    def path(self, position: int) -> Path:
        index = position if self.positions is None else int(self.positions[position])
        return self.files.path(index)

    def subset(self, positions: np.ndarray, labels: np.ndarray) -> Source:
        """The items at ``positions`` as a source of their own."""
        reader = FileListReader(self.files, positions)
        return Source(read=reader, labels=labels[positions], groups=None, path=reader.path)
