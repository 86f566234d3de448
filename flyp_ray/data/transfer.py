"""FLYP's transfer-learning and few-shot sets, read from local files by torchvision's own classes.

| ``dataset.name`` | torchvision class | train | id_val | id_test |
| --- | --- | --- | --- | --- |
| ``caltech101`` | ``Caltech101`` | 60% of each class | 20% of each class | 20% of each class |
| ``stanford_cars`` | ``StanfordCars`` | official train less id_val | 20% of official train | test |
| ``flowers102`` | ``Flowers102`` | train | val | test |
| ``pcam`` | ``PCAM`` (PatchCamelyon) | train | val | test |
| ``rendered_sst2`` | ``RenderedSST2`` | train | val | test |

Every class is built with ``download=False`` on the user's ``dataset.root``: this module checks
the files each class needs first, so a missing one is a :class:`DataError` naming it (and
torchvision never creates folders under a wrong root). Where a set has no validation split, one
is carved from its training images class by class with :data:`SPLIT_SEED`: the same split on
every machine, disjoint from train. None of these sets has a shift, so there are only ``id_*``
splits. Images are read lazily through the class's ``__getitem__``; only labels and file names
are read at load time. The few-shot sets (``pcam``, ``rendered_sst2``) load in full here; the
``train.k_shot`` draw happens downstream. docs/DATASETS.md shows each folder layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.io.matlab import MatReadError

from flyp_ray.config import DatasetConfig
from flyp_ray.data import prompts
from flyp_ray.data.base import (
    Loaded,
    Source,
    dataset_root,
    files_fingerprint,
    one_line,
    open_rgb,
)
from flyp_ray.errors import ConfigError, DataError

SPLIT_SEED = 0  # seeds every carved split; changing it changes which images are validation
VAL_FRACTION = 0.2  # of each class's training images, carved as id_val (StanfordCars; FLYP's 20%)
# Caltech101 has no official split: FLYP draws 60/20/20 of each class into train/val/test.
CALTECH101_FRACTIONS = (0.6, 0.2, 0.2)

# Our split -> torchvision's ``split`` argument, for the sets with three official splits;
# their files call the validation split "valid" (PCAM's h5 files, RenderedSST2's folders).
_SPLIT_ARGS = {"train": "train", "id_val": "val", "id_test": "test"}
_FILE_SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where torchvision looks for a set under ``dataset.root``, and where to get it."""

    folder: str  # the folder under dataset.root that torchvision reads
    required: tuple[str, ...]  # files and folders under ``folder`` the class needs
    url: str  # where the files come from


LAYOUTS: dict[str, Layout] = {
    "caltech101": Layout(
        "caltech101", ("101_ObjectCategories",),
        "caltech-101.zip at https://data.caltech.edu/records/mzrjq-6wc02",
    ),
    "stanford_cars": Layout(
        "stanford_cars",
        ("devkit/cars_meta.mat", "devkit/cars_train_annos.mat", "cars_train",
         "cars_test_annos_withlabels.mat", "cars_test"),
        "a copy in torchvision's layout, the original Stanford site being gone",
    ),
    "flowers102": Layout(
        "flowers-102", ("jpg", "imagelabels.mat", "setid.mat"),
        "102flowers.tgz and two .mat files at https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
    ),
    "pcam": Layout(
        "pcam",
        tuple(f"camelyonpatch_level_2_split_{s}_{xy}.h5"
              for s in _FILE_SPLITS for xy in ("x", "y")),
        "the .h5.gz files at https://github.com/basveeling/pcam, gunzipped",
    ),
    "rendered_sst2": Layout(
        "rendered-sst2",
        tuple(f"{s}/{c}" for s in _FILE_SPLITS for c in ("negative", "positive")),
        "https://openaipublic.azureedge.net/clip/data/rendered-sst2.tgz",
    ),
}
NAMES = tuple(LAYOUTS)


# --- the entry point -----------------------------------------------------------------------


def load(cfg: DatasetConfig, source: str) -> Loaded:
    """Load every split of a transfer or few-shot set; reads labels and file names, no images."""
    if cfg.download:
        problem = (f"{cfg.name} is read from local files only, got true "
                   "(docs/DATASETS.md says where to get it)")
        raise ConfigError(source, "dataset.download", problem)
    root = dataset_root(cfg, source)
    folder = check_layout(cfg.name, root, source)
    with _torchvision_errors(cfg.name, folder, source):
        sources, num_classes = _LOADERS[cfg.name](root)
    classnames = prompts.classnames_for(cfg.name, cfg.classnames, num_classes, source)
    return Loaded(sources=sources, classnames=classnames, where=str(folder))


def check_layout(name: str, root: Path, source: str) -> Path:
    """The set's folder under ``root``; a :class:`DataError` names the first missing path."""
    layout = LAYOUTS[name]
    folder = root / layout.folder
    for relative in layout.required:
        path = folder / relative
        if not path.exists():
            raise DataError(
                f"{source}: dataset.root: {name} not found: expected {path} (root {root}; "
                f"get it from {layout.url}; layout in docs/DATASETS.md)"
            )
    return folder


@contextlib.contextmanager
def _torchvision_errors(name: str, folder: Path, source: str) -> Iterator[None]:
    """Turn what torchvision, scipy or h5py raise on unreadable files into one-line DataErrors."""
    try:
        yield
    except RuntimeError as err:
        # The files exist (check_layout), so this is a failed integrity check (Flowers102
        # compares the md5 of its two .mat files) or a missing scipy or h5py.
        problem = f"torchvision rejects {name} in {folder} ({one_line(err)})"
        raise DataError(f"{source}: dataset.root: {problem}") from err
    except (OSError, ValueError, KeyError, IndexError, TypeError, MatReadError) as err:
        problem = f"cannot load {name} from {folder} ({one_line(err)})"
        raise DataError(f"{source}: dataset.root: {problem}") from err


# --- splits --------------------------------------------------------------------------------


def carve(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split positions ``0..len(labels)-1`` into disjoint parts, class by class.

    Each class's positions are shuffled with a generator seeded by ``seed`` (classes in label
    order); part ``k > 0`` takes ``round(fractions[k] * n)`` of them and part 0 the rest, so a
    class with a single image keeps it in part 0. Returns sorted position arrays.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for label in np.unique(labels):
        positions = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for k in range(1, len(fractions)):
            count = int(np.floor(fractions[k] * len(positions) + 0.5))
            parts[k].append(positions[start:start + count])
            start += count
        parts[0].append(positions[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


# --- reading -------------------------------------------------------------------------------


class _Reader:
    """Reads images of one torchvision data set through its own ``__getitem__``.

    ``indices`` maps a split's positions to the data set's indices. The data set object is
    rebuilt from ``open_dataset`` after pickling (a DataLoader worker started by spawn): PCAM's
    holds the h5py module, which does not pickle.
    """

    def __init__(self, dataset: Any, open_dataset: Callable[[], Any], indices: np.ndarray,
                 files: Sequence[Path] | None, container: Path | None = None) -> None:
        self._dataset = dataset
        self.open_dataset = open_dataset
        self.indices = indices
        self.files = files  # the image file of each data set index; None for an h5 set
        self.container = container  # the file that holds the images when ``files`` is None

    def __call__(self, position: int) -> Image.Image:
        index = int(self.indices[position])
        if self._dataset is None:
            self._dataset = self.open_dataset()
        dataset = self._dataset
        where = self.files[index] if self.files is not None else Path(f"{self.container}[{index}]")
        return open_rgb(lambda: dataset[index][0], where)

    def path(self, position: int) -> Path:
        assert self.files is not None  # _source gives path only for file-backed sets
        return self.files[int(self.indices[position])]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_dataset": None}


def _source(dataset: Any, open_dataset: Callable[[], Any], labels: np.ndarray,
            positions: np.ndarray, files: Sequence[Path] | None,
            container: Path | None = None) -> Source:
    reader = _Reader(dataset, open_dataset, positions, files, container)
    return Source(read=reader, labels=labels[positions].astype(np.int64), groups=None,
                  path=reader.path if files is not None else None,
                  fingerprint=files_fingerprint([container]) if container else "")


def _whole(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


# --- the sets ------------------------------------------------------------------------------

_Sources = tuple[dict[str, Source], int]  # the splits and the number of classes


def _caltech101(root: Path) -> _Sources:
    from torchvision.datasets import Caltech101

    open_dataset = functools.partial(Caltech101, str(root), download=False)
    dataset = open_dataset()
    labels = np.asarray(dataset.y, dtype=np.int64)
    base = Path(dataset.root) / "101_ObjectCategories"
    # Caltech101.__getitem__ opens image_<index:04d>.jpg in its category's folder; mirror it.
    files = [base / dataset.categories[y] / f"image_{i:04d}.jpg"
             for y, i in zip(dataset.y, dataset.index, strict=True)]
    parts = carve(labels, CALTECH101_FRACTIONS, SPLIT_SEED)
    sources = {name: _source(dataset, open_dataset, labels, part, files)
               for name, part in zip(("train", "id_val", "id_test"), parts, strict=True)}
    return sources, len(dataset.categories)


def _stanford_cars(root: Path) -> _Sources:
    from torchvision.datasets import StanfordCars

    def split(name: str) -> tuple[Any, Callable[[], Any], np.ndarray, list[Path]]:
        open_dataset = functools.partial(StanfordCars, str(root), split=name, download=False)
        dataset = open_dataset()
        labels = np.asarray([target for _, target in dataset._samples], dtype=np.int64)
        return dataset, open_dataset, labels, [Path(path) for path, _ in dataset._samples]

    train_set, open_train, train_labels, train_files = split("train")
    test_set, open_test, test_labels, test_files = split("test")
    train, val = carve(train_labels, (1 - VAL_FRACTION, VAL_FRACTION), SPLIT_SEED)
    sources = {
        "train": _source(train_set, open_train, train_labels, train, train_files),
        "id_val": _source(train_set, open_train, train_labels, val, train_files),
        "id_test": _source(test_set, open_test, test_labels, _whole(len(test_labels)), test_files),
    }
    return sources, len(train_set.classes)  # cars_meta.mat names the classes


def _flowers102(root: Path) -> _Sources:
    from torchvision.datasets import Flowers102

    sources = {}
    for ours, theirs in _SPLIT_ARGS.items():
        open_dataset = functools.partial(Flowers102, str(root), split=theirs, download=False)
        dataset = open_dataset()
        labels = np.asarray(dataset._labels, dtype=np.int64)
        files = [Path(p) for p in dataset._image_files]
        sources[ours] = _source(dataset, open_dataset, labels, _whole(len(labels)), files)
    # imagelabels.mat numbers the classes 1..102; the highest label seen sets the count.
    num_classes = max(int(s.labels.max()) for s in sources.values() if len(s.labels)) + 1
    return sources, num_classes


def _pcam(root: Path) -> _Sources:
    import h5py
    from torchvision.datasets import PCAM

    sources = {}
    for ours, theirs in _SPLIT_ARGS.items():
        open_dataset = functools.partial(PCAM, str(root), split=theirs, download=False)
        dataset = open_dataset()
        folder = Path(dataset._base_folder)
        # Labels straight from the targets file (shape [N, 1, 1, 1], as PCAM reads them): going
        # through __getitem__ would decode every image.
        with h5py.File(folder / PCAM._FILES[theirs]["targets"][0], "r") as targets:
            labels = np.asarray(targets["y"][:, 0, 0, 0], dtype=np.int64)
        images = folder / PCAM._FILES[theirs]["images"][0]
        sources[ours] = _source(dataset, open_dataset, labels, _whole(len(labels)), None, images)
    return sources, 2  # no tumour, tumour


def _rendered_sst2(root: Path) -> _Sources:
    from torchvision.datasets import RenderedSST2

    sources = {}
    for ours, theirs in _SPLIT_ARGS.items():
        open_dataset = functools.partial(RenderedSST2, str(root), split=theirs, download=False)
        dataset = open_dataset()
        labels = np.asarray([target for _, target in dataset._samples], dtype=np.int64)
        files = [Path(path) for path, _ in dataset._samples]
        sources[ours] = _source(dataset, open_dataset, labels, _whole(len(labels)), files)
    return sources, len(dataset.classes)  # negative, positive


_LOADERS: dict[str, Callable[[Path], _Sources]] = {
    "caltech101": _caltech101,
    "stanford_cars": _stanford_cars,
    "flowers102": _flowers102,
    "pcam": _pcam,
    "rendered_sst2": _rendered_sst2,
}
