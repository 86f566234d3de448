"""Transfer and few-shot sets: miniatures of each folder layout, read by torchvision's classes.

Each writer below builds the files and folder names that torchvision 0.29 reads, with a few
tiny images per class whose colour encodes their class, so a test can see that every item's
label belongs to its image. Nothing is mocked but Flowers102's md5 check of its two .mat files
(a miniature cannot match the official checksums); one test keeps that check and sees it fail.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from flyp_ray import cli
from flyp_ray.config import DatasetConfig
from flyp_ray.data import prompts, transfer
from flyp_ray.data.load import check_data, load_data
from flyp_ray.errors import ConfigError, DataError
from tests.support.configs import tiny_config, write_config

SPLITS = ("train", "id_val", "id_test")
SIZE = 8  # pixels a side


def _colour(label: int) -> tuple[int, int, int]:
    return (40 * label + 20, 255 - 40 * label, 128)


def _label_of(image: Image.Image) -> int:
    red = np.asarray(image.convert("RGB"))[..., 0].mean()
    return round(float(red - 20) / 40)


def _image(path: Path, label: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (SIZE, SIZE), _colour(label)).save(path)


# --- miniature layouts ---------------------------------------------------------------------


def write_caltech101(root: Path, per_class: int = 5) -> None:
    """``caltech101/101_ObjectCategories/<category>/image_0001.jpg``; BACKGROUND_Google is no
    class."""
    base = root / "caltech101" / "101_ObjectCategories"
    for label, category in enumerate(["Faces", "Faces_easy", "Leopards"]):
        for i in range(1, per_class + 1):
            _image(base / category / f"image_{i:04d}.jpg", label)
    _image(base / "BACKGROUND_Google" / "image_0001.jpg", 9)


def write_flowers102(root: Path, sizes: tuple[int, int, int] = (6, 3, 4)) -> None:
    """``flowers-102/jpg/image_00001.jpg`` with ``imagelabels.mat`` (1-based) and ``setid.mat``."""
    base = root / "flowers-102"
    total = sum(sizes)
    labels = np.arange(total) % 3 + 1  # classes 1..3, as the .mat numbers them
    for image_id in range(1, total + 1):
        _image(base / "jpg" / f"image_{image_id:05d}.jpg", int(labels[image_id - 1]) - 1)
    ids = np.arange(1, total + 1)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": labels.reshape(1, -1)})
    cut = np.cumsum(sizes)
    scipy.io.savemat(base / "setid.mat", {"trnid": ids[:cut[0]].reshape(1, -1),
                                          "valid": ids[cut[0]:cut[1]].reshape(1, -1),
                                          "tstid": ids[cut[1]:].reshape(1, -1)})


def _annotations(labels: list[int]) -> np.ndarray:
    kind = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
            ("class", "O"), ("fname", "O")]
    rows = [(1, 1, SIZE, SIZE, label + 1, f"{i + 1:05d}.jpg") for i, label in enumerate(labels)]
    return np.array(rows, dtype=kind).reshape(1, -1)


def write_stanford_cars(root: Path, train: int = 10, test: int = 4) -> None:
    """``stanford_cars/`` with devkit/cars_meta.mat, the annotation .mat files and both folders."""
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012",
                      "Acura TL Sedan 2012"], dtype=object).reshape(1, -1)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    for count, folder, mat in ((train, "cars_train", "devkit/cars_train_annos.mat"),
                               (test, "cars_test", "cars_test_annos_withlabels.mat")):
        labels = [i % 3 for i in range(count)]
        for i, label in enumerate(labels):
            _image(base / folder / f"{i + 1:05d}.jpg", label)
        scipy.io.savemat(base / mat, {"annotations": _annotations(labels)})


def write_pcam(root: Path, sizes: tuple[int, int, int] = (6, 4, 4)) -> None:
    """``pcam/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5`` as PCAM reads them."""
    base = root / "pcam"
    base.mkdir(parents=True)
    for split, n in zip(("train", "valid", "test"), sizes, strict=True):
        labels = np.arange(n) % 2
        pixels = np.stack([np.full((SIZE, SIZE, 3), _colour(int(y)), np.uint8) for y in labels])
        with h5py.File(base / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
            f["x"] = pixels
        with h5py.File(base / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
            f["y"] = labels.astype(np.uint8).reshape(n, 1, 1, 1)


def write_rendered_sst2(root: Path, sizes: tuple[int, int, int] = (3, 2, 2)) -> None:
    """``rendered-sst2/{train,valid,test}/{negative,positive}/<n>.png``."""
    for split, n in zip(("train", "valid", "test"), sizes, strict=True):
        for label, sentiment in enumerate(("negative", "positive")):
            for i in range(n):
                _image(root / "rendered-sst2" / split / sentiment / f"{i}.png", label)


Writer = Callable[[Path], None]
# name -> (writer, expected split sizes, expected class count)
MINIATURES: dict[str, tuple[Writer, dict[str, int], int]] = {
    "caltech101": (write_caltech101, {"train": 9, "id_val": 3, "id_test": 3}, 3),
    "stanford_cars": (write_stanford_cars, {"train": 7, "id_val": 3, "id_test": 4}, 3),
    "flowers102": (write_flowers102, {"train": 6, "id_val": 3, "id_test": 4}, 3),
    "pcam": (write_pcam, {"train": 6, "id_val": 4, "id_test": 4}, 2),
    "rendered_sst2": (write_rendered_sst2, {"train": 6, "id_val": 4, "id_test": 4}, 2),
}


@pytest.fixture(autouse=True)
def flowers_md5_by_presence(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flowers102 checks the official md5 of its .mat files; a miniature has other bytes."""
    import torchvision.datasets.flowers102 as flowers

    monkeypatch.setattr(flowers, "check_integrity",
                        lambda fpath, md5=None: os.path.isfile(fpath))


def _identity(image: Image.Image) -> Image.Image:
    return image


def _load(name: str, root: Path, **extra: Any) -> Any:
    cfg = DatasetConfig(name=name, root=str(root), **extra)  # type: ignore[arg-type]
    return load_data(cfg, _identity, _identity, "test.yaml")


# --- every set through the real loader -----------------------------------------------------


@pytest.mark.parametrize("name", sorted(MINIATURES))
def test_miniature_loads_with_right_splits_classes_and_labels(name: str, tmp_path: Path) -> None:
    writer, sizes, num_classes = MINIATURES[name]
    writer(tmp_path)
    data = _load(name, tmp_path)
    assert tuple(data.splits) == SPLITS
    assert {k: len(s.dataset) for k, s in data.splits.items()} == sizes
    builtin = prompts.builtin_classnames(name)
    assert builtin is not None and data.classnames == builtin[:num_classes]
    assert data.templates == list(prompts.TEMPLATES[name])
    for split in data.splits.values():
        assert split.labels.dtype == torch.int64 and split.groups is None
        assert set(split.labels.tolist()) <= set(range(num_classes))
        for i in range(len(split.dataset)):
            image, label, index = split.dataset[i]
            assert isinstance(image, Image.Image) and image.mode == "RGB"
            assert index == i and label == int(split.labels[i]) == _label_of(image)


@pytest.mark.parametrize("name", sorted(MINIATURES))
def test_validate_accepts_the_config_when_the_data_is_there(
        name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    MINIATURES[name][0](tmp_path / "data")
    raw = tiny_config(tmp_path, dataset={"name": name, "root": str(tmp_path / "data")},
                      train={"batch_size": 4})  # the miniatures have 6 to 9 training images
    assert cli.main(["validate", str(write_config(tmp_path / "c.yaml", raw))]) == 0
    out = capsys.readouterr().out
    sizes = MINIATURES[name][1]
    assert f"3 splits (train {sizes['train']}, id_val {sizes['id_val']}" in out


@pytest.mark.parametrize("name", sorted(MINIATURES))
def test_validate_names_the_missing_path_and_exits_2(
        name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tiny_config(tmp_path, dataset={"name": name, "root": str(tmp_path / "nothing")})
    assert cli.main(["validate", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    err = capsys.readouterr().err
    layout = transfer.LAYOUTS[name]
    expected = tmp_path / "nothing" / layout.folder / layout.required[0]
    assert f"dataset.root: {name} not found: expected {expected}" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "nothing").exists()  # nothing created under a wrong root


def test_a_half_copied_set_names_the_file_that_is_missing(tmp_path: Path) -> None:
    write_stanford_cars(tmp_path)
    (tmp_path / "stanford_cars" / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DataError, match="expected .*stanford_cars/cars_test_annos_withlabels.mat"):
        check_data(DatasetConfig(name="stanford_cars", root=str(tmp_path)), "c.yaml")


def test_flowers102_with_other_mat_files_than_the_official_ones_is_a_data_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # torchvision's own md5 check, as on a user's machine
    write_flowers102(tmp_path)
    with pytest.raises(DataError, match="torchvision rejects flowers102 in .*flowers-102"):
        check_data(DatasetConfig(name="flowers102", root=str(tmp_path)), "c.yaml")


def test_a_broken_mat_file_is_a_one_line_data_error(tmp_path: Path) -> None:
    write_stanford_cars(tmp_path)
    (tmp_path / "stanford_cars" / "devkit" / "cars_meta.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="cannot load stanford_cars from"):
        check_data(DatasetConfig(name="stanford_cars", root=str(tmp_path)), "c.yaml")


def test_download_is_refused_with_the_key(tmp_path: Path) -> None:
    write_pcam(tmp_path)
    with pytest.raises(ConfigError, match="dataset.download: pcam is read from local files"):
        _load("pcam", tmp_path, download=True)


# --- lazy reading, subsampling, pickling ---------------------------------------------------


def test_loading_reads_no_image_and_a_broken_one_fails_when_read(tmp_path: Path) -> None:
    write_caltech101(tmp_path)
    broken = tmp_path / "caltech101" / "101_ObjectCategories" / "Leopards" / "image_0002.jpg"
    broken.write_bytes(b"not a jpeg")
    data = _load("caltech101", tmp_path)  # would fail here if it decoded images
    split, position = next((s, p) for s in data.splits.values()
                           for p in range(len(s.dataset))
                           if s.dataset.read.path(int(s.dataset.positions[p])) == broken)
    with pytest.raises(DataError, match=f"cannot read image {broken}"):
        split.dataset[position]


def test_subsample_keeps_working(tmp_path: Path) -> None:
    write_caltech101(tmp_path, per_class=10)
    full = _load("caltech101", tmp_path)
    small = _load("caltech101", tmp_path, subsample=4)
    assert [len(s.dataset) for s in small.splits.values()] == [4, 4, 4]
    kept = small.splits["train"].dataset.positions
    assert set(kept) <= set(full.splits["train"].dataset.positions)


@pytest.mark.parametrize("name", ["pcam", "caltech101"])
def test_a_split_pickles_and_reads_after(name: str, tmp_path: Path) -> None:
    MINIATURES[name][0](tmp_path)
    split = _load(name, tmp_path).splits["id_test"]
    split.dataset[0]  # opened here; a spawned DataLoader worker gets a copy without it
    copy = pickle.loads(pickle.dumps(split.dataset))
    image, label, _ = copy[1]
    assert label == _label_of(image) == int(split.labels[1])


# --- carved splits -------------------------------------------------------------------------


def test_carve_is_disjoint_complete_stratified_and_seeded() -> None:
    labels = np.repeat(np.arange(4), [10, 20, 1, 7])
    parts = transfer.carve(labels, (0.6, 0.2, 0.2), seed=0)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(labels)))  # disjoint and complete
    for part, fraction in zip(parts[1:], (0.2, 0.2), strict=True):
        counts = np.bincount(labels[part], minlength=4)
        assert counts.tolist() == [round(fraction * n) for n in (10, 20, 1, 7)]
    assert 2 in labels[parts[0]]  # a class with one image keeps it in train
    again = transfer.carve(labels, (0.6, 0.2, 0.2), seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = transfer.carve(labels, (0.6, 0.2, 0.2), seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_carved_splits_do_not_share_images(tmp_path: Path) -> None:
    write_stanford_cars(tmp_path, train=30)
    data = _load("stanford_cars", tmp_path)
    def files(split: str) -> set[Path]:
        dataset = data.splits[split].dataset
        return {dataset.read.path(i) for i in range(len(dataset))}
    assert not files("train") & files("id_val")
    assert len(files("id_val")) == round(transfer.VAL_FRACTION * 30)


# --- class names, templates and search spaces ----------------------------------------------


@pytest.mark.parametrize("name,count", [("caltech101", 101), ("stanford_cars", 196),
                                        ("flowers102", 102), ("pcam", 2), ("rendered_sst2", 2)])
def test_builtin_class_names_are_clips(name: str, count: int) -> None:
    names = prompts.builtin_classnames(name)
    assert names is not None and len(names) == count == len(set(names))
    first = {"caltech101": "off-center face", "stanford_cars": "AM General Hummer SUV 2000",
             "flowers102": "pink primrose", "pcam": "lymph node", "rendered_sst2": "negative"}
    assert names[0] == first[name]
    assert prompts.templates_for(None, name, "c.yaml") == list(prompts.TEMPLATES[name])


# The search-space files' FLYP settings (epochs, lr, decay, batch, warm-up, templates, k) are
# checked against a table of the reference's values in tests/test_yaml_files.py.
