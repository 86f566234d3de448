"""ImageFolder trees as people keep them, read by the real loader: split folders, class names,
and each case a user's folder holds (docs/DATASETS.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from flyp_ray.config import DatasetConfig
from flyp_ray.data import load
from flyp_ray.data.digest import data_digest
from flyp_ray.errors import BadInput, ConfigError, DataError
from tests.support.own_data import CLASSES, write_imagefolder

SRC = "pets.yaml"


def cfg(root: Path, **kw: object) -> DatasetConfig:
    return DatasetConfig(name="imagefolder", root=str(root), **kw)  # type: ignore[arg-type]


@pytest.fixture()
def pets(tmp_path: Path) -> Path:
    return write_imagefolder(tmp_path / "pets")


def test_splits_classes_and_labels(pets: Path) -> None:
    data = load.load_data(cfg(pets), lambda im: im.size, lambda im: im.size, SRC)
    assert list(data.splits) == ["train", "id_val", "id_test"]
    assert data.classnames == ["golden retriever", "parrot", "tabby cat"]  # sorted folders
    train = data.splits["train"]
    assert train.labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert train.dataset[0] == ((24, 24), 0, 0)  # the JPEG of the first class, decoded
    assert len(data.splits["id_val"].dataset) == 12 and data.splits["id_val"].groups is None


@pytest.mark.parametrize("folder", ["valid", "validation"])
def test_validation_folder_names_and_ood_splits(tmp_path: Path, folder: str) -> None:
    root = write_imagefolder(tmp_path / "x", {"train": 2, folder: 1, "ood_test": 1})
    facts = load.inspect_data(cfg(root), SRC)
    assert list(facts.splits) == ["train", "id_val", "ood_test"]


def test_without_a_validation_folder_id_val_is_carved(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "x", {"train": 10, "test": 2})
    facts = load.inspect_data(cfg(root), SRC)
    assert {n: s.size for n, s in facts.splits.items()} == {"train": 24, "id_val": 6,
                                                            "id_test": 6}
    assert "id_val carved from train" in facts.line
    a = load.load_sources(cfg(root), SRC)
    train = {str(a.sources["train"].path(i)) for i in range(24)}
    val = {str(a.sources["id_val"].path(i)) for i in range(6)}
    assert not train & val  # disjoint, and the same on a second load
    b = load.load_sources(cfg(root), SRC)
    assert val == {str(b.sources["id_val"].path(i)) for i in range(6)}


def test_non_images_are_skipped_and_counted_hidden_files_ignored(pets: Path) -> None:
    (pets / "train" / "parrot" / "notes.txt").write_text("not an image")
    (pets / "val" / "Thumbs.db").write_bytes(b"\0")
    (pets / "train" / "parrot" / ".DS_Store").write_bytes(b"\0")
    (pets / "train" / "parrot" / "._001.png").write_bytes(b"\0")  # AppleDouble, not a PNG
    (pets / "train" / "parrot" / "more").mkdir()
    Image.new("RGB", (8, 8)).save(pets / "train" / "parrot" / "more" / "x.webp")  # nested
    facts = load.inspect_data(cfg(pets), SRC)
    assert facts.splits["train"].size == 25
    assert "skipped 2 file(s) that are not images" in facts.line


def test_a_class_missing_from_an_eval_split_is_said(pets: Path) -> None:
    for image in (pets / "test" / "parrot").iterdir():
        image.unlink()  # an empty class folder counts as missing
    facts = load.inspect_data(cfg(pets), SRC)
    assert facts.splits["id_test"].size == 8
    assert "id_test has no images of 1 class(es) (parrot)" in facts.line


# (what is wrong, how to make it, text the one-line error must hold)
REFUSED = [
    ("unknown split folder", lambda r: (r / "extra").mkdir(), ["extra/", "is not a split",
                                                               "val|valid|validation"]),
    ("two val folders", lambda r: (r / "valid" / "x").mkdir(parents=True),
     ["val/", "valid/", "both id_val"]),
    ("no train folder", lambda r: (r / "train").rename(r / "ood_val"), ["train", "not found"]),
    ("empty train class", lambda r: (r / "train" / "hamster").mkdir(),
     ["train/hamster/", "holds no images"]),
    ("unknown eval class", lambda r: (r / "test" / "tabby-cats").mkdir() or
     Image.new("RGB", (8, 8)).save(r / "test" / "tabby-cats" / "a.png"),
     ["test/tabby-cats/", "did you mean 'tabby-cat'"]),
    ("image in no class", lambda r: Image.new("RGB", (8, 8)).save(r / "val" / "loose.png"),
     ["val/loose.png", "no label"]),
    # validate decodes 8 images of each split, spread over it, the first among them
    ("undecodable image", lambda r: (r / "test" / "golden_retriever" / "000.jpg").write_bytes(
        b"HEIC?"), ["cannot read image", "test/golden_retriever/000.jpg"]),
    ("two folders, one name", lambda r: [(r / s / "golden-retriever").mkdir() or Image.new(
        "RGB", (8, 8)).save(r / s / "golden-retriever" / "a.png") for s in ("train",)],
     ["dataset.classnames", "golden-retriever, golden_retriever"]),
]


@pytest.mark.parametrize(("make", "needles"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_at_validate_with_the_path(pets: Path, make: object, needles: list[str]) -> None:
    make(pets)  # type: ignore[operator]
    with pytest.raises(BadInput) as refused:
        load.inspect_data(cfg(pets), SRC)
    message = str(refused.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_classes_as_split_folders_get_a_hint(tmp_path: Path) -> None:
    for name in CLASSES:
        (tmp_path / "flat" / name).mkdir(parents=True)
    with pytest.raises(DataError, match="class folders go under .*/train/"):
        load.inspect_data(cfg(tmp_path / "flat"), SRC)


def test_classnames_file_overrides_folder_names(pets: Path, tmp_path: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("retriever\nparrot\ncat\n")
    assert load.inspect_data(cfg(pets, classnames=str(names)), SRC).classnames == (
        "retriever", "parrot", "cat")
    names.write_text("retriever\nparrot\n")
    with pytest.raises(ConfigError, match="dataset.classnames"):
        load.inspect_data(cfg(pets, classnames=str(names)), SRC)


def test_digest_follows_images_and_membership(pets: Path) -> None:
    before = data_digest(cfg(pets), SRC)
    assert before == data_digest(cfg(pets), SRC)
    image = pets / "val" / "parrot" / "002.png"
    stat = image.stat()
    Image.new("RGB", (24, 24), (9, 9, 9)).save(image)  # rewritten, same name
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    after = data_digest(cfg(pets), SRC)
    assert [n for n in before.splits if before.splits[n] != after.splits[n]] == ["id_val"]
    image.rename(pets / "test" / "parrot" / "moved.png")  # from val to test
    moved = data_digest(cfg(pets), SRC)
    assert moved.splits["id_val"].size == 11 and moved.splits["id_test"].size == 13
    assert moved.splits["train"] == before.splits["train"]
