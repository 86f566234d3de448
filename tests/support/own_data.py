"""A user's own data, as people keep it: an ImageFolder tree and a Hugging Face ``datasets``
DatasetDict written with ``save_to_disk`` (and a copy of it in the layout of the library's hub
cache). Images carry their class in their colour (``wilds_folder.class_image``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from tests.support.wilds_folder import class_image

CLASSES = ("golden_retriever", "tabby-cat", "parrot")  # folder names; prompts read spaces
PER_SPLIT = {"train": 8, "val": 4, "test": 4}  # images per class


def write_imagefolder(root: Path, per_split: dict[str, int] | None = None,
                      classes: tuple[str, ...] = CLASSES, size: int = 24, seed: int = 0) -> Path:
    """``root/<split>/<class>/<i>.png`` (and a JPEG per class), plus a README at the root."""
    rng = np.random.default_rng(seed)
    for split, count in (per_split or PER_SPLIT).items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = class_image(label, len(classes), int(split == "ood_test"), size, rng)
                suffix = "jpg" if i == 0 else "png"
                image.save(folder / f"{i:03d}.{suffix}")
    (root / "README.md").write_text("my pets\n")
    return root


def dataset_dict(per_split: dict[str, int] | None = None, classes: tuple[str, ...] = CLASSES,
                 size: int = 24, seed: int = 0) -> object:
    """A DatasetDict with an ``Image`` column ``img`` and a ``ClassLabel`` column ``kind``, plus
    an unrelated text column; split names as the hub has them (``validation``)."""
    import datasets

    rng = np.random.default_rng(seed)
    features = datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(
        names=list(classes)), "caption": datasets.Value("string")})
    splits = {}
    for split, count in (per_split or {"train": 8, "validation": 4, "test": 4}).items():
        labels = [label for label in range(len(classes)) for _ in range(count)]
        images = [class_image(y, len(classes), 0, size, rng) for y in labels]
        splits[split] = datasets.Dataset.from_dict(
            {"img": images, "kind": labels, "caption": [f"#{i}" for i in range(len(labels))]},
            features=features)
    return datasets.DatasetDict(splits)


def write_saved_dataset(folder: Path, **kw: object) -> Path:
    """``dataset_dict(**kw).save_to_disk(folder)``."""
    data = dataset_dict(**kw)  # type: ignore[arg-type]
    data.save_to_disk(str(folder))  # type: ignore[attr-defined]
    return folder


def write_hub_cache(cache: Path, repo_id: str, work: Path) -> Path:
    """A cached hub data set ``repo_id`` under ``cache`` (what ``HF_DATASETS_CACHE`` points
    at), as ``load_dataset(repo_id)`` left it: prepared Arrow files in
    ``<org>___<name>/default/0.0.0/<hash>/``. Written by the library's own parquet builder,
    then filed under the repository's name."""
    import datasets

    data = dataset_dict()
    files = {}
    for split, part in data.items():  # type: ignore[attr-defined]
        files[split] = str(work / f"{split}.parquet")
        part.to_parquet(files[split])
    builder = datasets.load_dataset_builder("parquet", data_files=files, cache_dir=str(work))
    builder.download_and_prepare()
    prepared = Path(builder.cache_dir)
    org, name = repo_id.split("/")
    target = cache / f"{org}___{name}" / "default" / "0.0.0" / prepared.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(prepared, target)
    for arrow in target.glob("parquet-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace("parquet-", f"{name}-")))
    info = json.loads((target / "dataset_info.json").read_text())
    info.update(config_name="default", dataset_name=name, builder_name=name)
    (target / "dataset_info.json").write_text(json.dumps(info))
    return target
