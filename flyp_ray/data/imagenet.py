"""ImageNet (ILSVRC-2012) as the ID data set, and its distribution shifts as OOD test sets.

Splits, all read from folders the user already has (nothing is downloaded):

| split | from | classes |
| --- | --- | --- |
| ``train`` | ``<root>/train/<wnid>/*.JPEG`` less ``id_val`` | 1000 |
| ``id_val`` | :data:`ID_VAL_FRACTION` of each train class, drawn with :data:`ID_VAL_SEED` | 1000 |
| ``id_test`` | ``<root>/val/<wnid>/*.JPEG``: the 50,000 ILSVRC validation images | 1000 |
| ``ood_test/imagenet_v2`` | ``imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg`` | 1000 |
| ``ood_test/imagenet_r`` | ``imagenet-r/<wnid>/*.jpg`` | 200 |
| ``ood_test/imagenet_a`` | ``imagenet-a/<wnid>/*.jpg`` | 200 |
| ``ood_test/imagenet_sketch`` | ``sketch/<wnid>/*.JPEG`` | 1000 |
| ``ood_test/objectnet`` | ``objectnet-1.0/images/<folder>/*.png`` with ``mappings/`` | 113 |

The shift sets live under ``dataset.ood_root`` (default: the folder that holds ``root``) under
the names above, and only those named in ``dataset.ood_sets`` are read. A class is its index in
the sorted list of the 1000 wnids (the standard ImageNet order, that of open_clip's class names),
shipped with the package with the 200-class lists of ImageNet-R and ImageNet-A
(``flyp_ray/data/classnames/imagenet*_wnids.txt``, as in timm and in the data sets' own code), so no
set needs every class folder. The model always scores the 1000 classes; a set with fewer classes
carries a ``class_map`` (:class:`flyp_ray.data.base.Split`) and is scored on its own classes, as its
authors score it: ImageNet-R and ImageNet-A on their 200, ObjectNet on the 113 classes its
``mappings/`` match to ImageNet, each taking the highest logit of its ImageNet classes.

Loading lists folders and reads no image; images are decoded when a DataLoader asks.
docs/DATASETS.md says where to get each set.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from flyp_ray.config import DatasetConfig
from flyp_ray.data import prompts
from flyp_ray.data.base import FileList, Loaded, Source, dataset_root, one_line, open_rgb
from flyp_ray.errors import DataError

NUM_CLASSES = 1000
# id_val: 1% of each train class (about 13 images, 12,800 in all), rounded up so that every
# class with two or more images gives one. Drawn per class from (ID_VAL_SEED, class index), so
# the held-out images of a class are the same whichever other class folders exist.
ID_VAL_FRACTION = 0.01
ID_VAL_SEED = 0
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})
# Each shift set's folder under dataset.ood_root, named as its release unpacks.
OOD_FOLDERS: dict[str, str] = {
    "imagenet_v2": "imagenetv2-matched-frequency-format-val",
    "imagenet_r": "imagenet-r",
    "imagenet_a": "imagenet-a",
    "imagenet_sketch": "sketch",
    "objectnet": "objectnet-1.0",
}
# ObjectNet's images carry a one-pixel red border; WiSE-FT and FLYP crop 2 pixels off each side.
OBJECTNET_BORDER = 2

Classes = list[tuple[str, list[str]]]  # (class folder name, its sorted image file names)


# --- class lists ---------------------------------------------------------------------------


def wnids(subset: str = "imagenet") -> list[str]:
    """The sorted wnids of ImageNet (``imagenet``), ``imagenet_r`` or ``imagenet_a``."""
    resource = importlib.resources.files("flyp_ray.data").joinpath(f"classnames/{subset}_wnids.txt")
    return resource.read_text("utf-8").split()


def subset_class_map(subset: Sequence[str]) -> torch.Tensor:
    """The class map of a set whose classes are ``subset`` (wnids, in its label order)."""
    index = {w: i for i, w in enumerate(wnids())}
    class_map = torch.full((NUM_CLASSES,), -1, dtype=torch.int64)
    class_map[torch.as_tensor([index[w] for w in subset])] = torch.arange(len(subset))
    return class_map


# --- the entry point -----------------------------------------------------------------------


def load(cfg: DatasetConfig, source: str) -> Loaded:
    """ImageNet's splits and the shift sets of ``cfg.ood_sets``, as file lists (no image read)."""
    root = dataset_root(cfg, source)
    index = {w: i for i, w in enumerate(wnids())}
    train = _list_classes(root / "train", "dataset.root", source, "ImageNet train folder")
    train_labels = _wnid_labels(train, index, root / "train", "dataset.root", source)
    kept, held_out = _carve_id_val(train, train_labels)
    val_folder = root / "val"
    val = _list_classes(val_folder, "dataset.root", source, "ImageNet val folder",
                        hint="class folders val/<wnid>/ as train/ has; sort the flat "
                             "ILSVRC2012_val_*.JPEG files into them first")
    sources = {
        "train": _source(root / "train", kept, train_labels),
        "id_val": _source(root / "train", held_out, train_labels),
        "id_test": _source(val_folder, val,
                           _wnid_labels(val, index, val_folder, "dataset.root", source)),
    }
    ood_root = _ood_root(cfg, root)
    for name in cfg.ood_sets or []:
        sources[f"ood_test/{name}"] = _OOD_LOADERS[name](ood_root / OOD_FOLDERS[name], source)
    classnames = prompts.classnames_for("imagenet", cfg.classnames, NUM_CLASSES, source)
    return Loaded(sources=sources, classnames=classnames, where=str(root))


def _ood_root(cfg: DatasetConfig, root: Path) -> Path:
    # The usual layout keeps ImageNet and its shift sets side by side in one data folder
    # (WiSE-FT's and FLYP's --data-location), so the default is the folder holding root.
    return Path(cfg.ood_root).expanduser() if cfg.ood_root else root.parent


# --- folders -------------------------------------------------------------------------------


def _list_classes(folder: Path, key: str, source: str, what: str, hint: str = "") -> Classes:
    """Class folders of ``folder`` in sorted order, each with its sorted image files."""
    if not folder.is_dir():
        raise DataError(f"{source}: {key}: {what} not found: expected folder {folder}")
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DataError(f"{source}: {key}: {what} {folder} has no class folders"
                        + (f" (expected {hint})" if hint else ""))
    classes = [(name, _image_files(folder / name)) for name in names]
    if not any(files for _, files in classes):
        raise DataError(f"{source}: {key}: {what} {folder} holds no images "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    return classes


def _image_files(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries
                      if Path(e.name).suffix.lower() in IMAGE_SUFFIXES and e.is_file())


def _wnid_labels(classes: Classes, index: dict[str, int], folder: Path, key: str,
                 source: str) -> list[int]:
    unknown = [name for name, _ in classes if name not in index]
    if unknown:
        raise DataError(f"{source}: {key}: {folder / unknown[0]} is not an ImageNet class "
                        f"folder (a wnid such as n01440764)")
    return [index[name] for name, _ in classes]


def _carve_id_val(classes: Classes, labels: list[int]) -> tuple[Classes, Classes]:
    """Split each train class into (train, id_val) file lists: disjoint, the same every run."""
    kept, held_out = [], []
    for (name, files), label in zip(classes, labels, strict=True):
        count = math.ceil(len(files) * ID_VAL_FRACTION) if len(files) >= 2 else 0
        rng = np.random.default_rng((ID_VAL_SEED, label))
        chosen = set(rng.choice(len(files), size=count, replace=False).tolist())
        kept.append((name, [f for i, f in enumerate(files) if i not in chosen]))
        held_out.append((name, [f for i, f in enumerate(files) if i in chosen]))
    return kept, held_out


def _source(folder: Path, classes: Classes, labels: Sequence[int],
            class_map: torch.Tensor | None = None, border: int = 0) -> Source:
    names: list[str] = []
    items: list[int] = []
    for (name, files), label in zip(classes, labels, strict=True):
        names += [f"{name}/{f}" for f in files]
        items += [label] * len(files)
    reader = _Reader(FileList(folder, names), border)
    return Source(read=reader, labels=np.asarray(items, dtype=np.int64), groups=None,
                        path=reader.path, class_map=class_map)


class _Reader:
    """Reads one split's images; ``border`` pixels are cropped off each side."""

    def __init__(self, files: FileList, border: int = 0) -> None:
        self.files = files
        self.border = border

    def __call__(self, position: int) -> Image.Image:
        path = self.files.path(position)
        return open_rgb(lambda: self._open(path), path)

    def _open(self, path: Path) -> Image.Image:
        image = Image.open(path)
        if not self.border:
            return image
        b = self.border
        return image.crop((b, b, image.width - b, image.height - b))

    def path(self, position: int) -> Path:
        return self.files.path(position)


# --- the shift sets ------------------------------------------------------------------------


def _load_imagenet_v2(folder: Path, source: str) -> Source:
    # ImageNetV2's folders are the class indices themselves, 0..999.
    classes = _list_classes(folder, "dataset.ood_root", source, "ImageNetV2 folder")
    bad = [n for n, _ in classes if not (n.isdigit() and int(n) < NUM_CLASSES)]
    if bad:
        raise DataError(f"{source}: dataset.ood_root: {folder / bad[0]} is not an ImageNetV2 "
                        f"class folder (0..{NUM_CLASSES - 1})")
    return _source(folder, classes, [int(n) for n, _ in classes])


def _load_sketch(folder: Path, source: str) -> Source:
    classes = _list_classes(folder, "dataset.ood_root", source, "ImageNet-Sketch folder")
    index = {w: i for i, w in enumerate(wnids())}
    return _source(folder, classes, _wnid_labels(classes, index, folder, "dataset.ood_root",
                                                 source))


def _load_subset(subset: str, what: str) -> Callable[[Path, str], Source]:
    def load_set(folder: Path, source: str) -> Source:
        classes = _list_classes(folder, "dataset.ood_root", source, f"{what} folder")
        ours = wnids(subset)
        index = {w: i for i, w in enumerate(ours)}
        unknown = [n for n, _ in classes if n not in index]
        if unknown:
            raise DataError(f"{source}: dataset.ood_root: {folder / unknown[0]} is not one of "
                            f"{what}'s {len(ours)} class folders")
        # Labels index the set's own class list, which the class map spreads over ImageNet's.
        return _source(folder, classes, [index[n] for n, _ in classes], subset_class_map(ours))

    return load_set


def _load_objectnet(folder: Path, source: str) -> Source:
    folders, class_map = objectnet_classes(folder / "mappings", source)
    images = folder / "images"
    classes = _list_classes(images, "dataset.ood_root", source, "ObjectNet images folder")
    known = _read_json(folder / "mappings" / "folder_to_objectnet_label.json", source)
    unknown = [n for n, _ in classes if n not in known]
    if unknown:
        raise DataError(f"{source}: dataset.ood_root: {images / unknown[0]} is not an ObjectNet "
                        "class folder (folder_to_objectnet_label.json does not list it)")
    # ObjectNet classes without an ImageNet counterpart are left out, as the benchmark does.
    position = {f: i for i, f in enumerate(folders)}
    kept = [(n, files) for n, files in classes if n in position]
    if not any(files for _, files in kept):
        raise DataError(f"{source}: dataset.ood_root: {images} has no images of the ObjectNet "
                        "classes that mappings/objectnet_to_imagenet_1k.json matches to ImageNet")
    return _source(images, kept, [position[n] for n, _ in kept], class_map,
                   border=OBJECTNET_BORDER)


def objectnet_classes(mappings: Path, source: str) -> tuple[list[str], torch.Tensor]:
    """ObjectNet's classes that have ImageNet counterparts, from the release's ``mappings/``.

    Returns their folder names in sorted order (class ``k`` is the ``k``-th) and the class map
    that sends each ImageNet class to its ObjectNet class (-1 for none). The chain is the
    release's: folder -> ObjectNet name (``folder_to_objectnet_label.json``) -> ImageNet names
    joined by ``"; "`` (``objectnet_to_imagenet_1k.json``) -> line of the ILSVRC devkit's label
    list (``imagenet_to_label_2012_v2``) -> the standard class index
    (``pytorch_to_imagenet_2012_id.json``, standard index -> devkit line).
    """
    to_name = _read_json(mappings / "folder_to_objectnet_label.json", source)
    to_imagenet = _read_json(mappings / "objectnet_to_imagenet_1k.json", source)
    to_line = _read_json(mappings / "pytorch_to_imagenet_2012_id.json", source)
    lines = _read_text(mappings / "imagenet_to_label_2012_v2", source).splitlines()
    try:
        indices_of: dict[str, list[int]] = defaultdict(list)
        for ours, line in to_line.items():
            indices_of[lines[int(line)].strip()].append(int(ours))
        folders = sorted(f for f, name in to_name.items() if name in to_imagenet)
        class_map = torch.full((NUM_CLASSES,), -1, dtype=torch.int64)
        for k, folder in enumerate(folders):
            for imagenet_name in to_imagenet[to_name[folder]].split("; "):
                if not indices_of.get(imagenet_name):
                    raise KeyError(f"ImageNet class {imagenet_name!r} of {to_name[folder]!r}")
                for i in indices_of[imagenet_name]:
                    if int(class_map[i]) not in (-1, k):
                        raise ValueError(f"ImageNet class {i} belongs to two ObjectNet classes")
                    class_map[i] = k
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as err:
        raise DataError(f"{source}: dataset.ood_root: ObjectNet mappings in {mappings} do not "
                        f"fit together ({one_line(err)})") from err
    if not folders:
        raise DataError(f"{source}: dataset.ood_root: ObjectNet mappings in {mappings} match no "
                        "class to ImageNet")
    return folders, class_map


def _read_text(path: Path, source: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{source}: dataset.ood_root: ObjectNet mapping not found: expected "
                        f"{path} (objectnet-1.0/mappings/ of the release)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{source}: dataset.ood_root: cannot read {path} "
                        f"({one_line(err)})") from err


def _read_json(path: Path, source: str) -> dict[str, Any]:
    try:
        value = json.loads(_read_text(path, source))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({one_line(err)})") from err
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


_OOD_LOADERS = {
    "imagenet_v2": _load_imagenet_v2,
    "imagenet_r": _load_subset("imagenet_r", "ImageNet-R"),
    "imagenet_a": _load_subset("imagenet_a", "ImageNet-A"),
    "imagenet_sketch": _load_sketch,
    "objectnet": _load_objectnet,
}
