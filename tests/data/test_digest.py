"""Data digests: the same files give the same digest, any change to an image, a label or a
split's membership gives another, on the real loaders and folders the tests write."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flyp_ray.config import DatasetConfig
from flyp_ray.data.digest import DIGEST_CHARS, DataDigest, data_digest
from flyp_ray.errors import DataError
from tests.support.wilds_folder import write_csv_dataset

SRC = "cfg.yaml"


def csv_cfg(root: Path, **kw: object) -> DatasetConfig:
    return DatasetConfig(name="csv", root=str(root), classnames=str(root / "classnames.txt"),
                         **kw)  # type: ignore[arg-type]


def changed(before: DataDigest, after: DataDigest) -> list[str]:
    """The splits whose digest moved."""
    return sorted(n for n in before.splits if before.splits[n].digest != after.splits[n].digest)


@pytest.fixture()
def csv_root(tmp_path: Path) -> Path:
    return write_csv_dataset(tmp_path / "pets", n_per_split=6, num_classes=3)


def test_same_files_same_digest_and_its_shape(csv_root: Path) -> None:
    first = data_digest(csv_cfg(csv_root), SRC)
    second = data_digest(csv_cfg(csv_root), SRC)
    assert first == second
    assert len(first.digest) == DIGEST_CHARS and int(first.digest, 16) >= 0
    assert first.source == str(csv_root.resolve()) and first.name == "pets"
    assert first.kind == "csv"
    assert {n: s.size for n, s in first.splits.items()} == {
        "train": 6, "id_val": 6, "id_test": 6, "ood_val": 6, "ood_test": 6}
    assert len({s.digest for s in first.splits.values()}) == 5


def test_a_rewritten_image_moves_its_split_only(csv_root: Path) -> None:
    before = data_digest(csv_cfg(csv_root), SRC)
    image = csv_root / "images" / "id_val_0002.png"
    stat = image.stat()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # even within one tick
    after = data_digest(csv_cfg(csv_root), SRC)
    assert changed(before, after) == ["id_val"]
    assert after.digest != before.digest


def test_a_label_or_a_split_change_moves_the_digest(csv_root: Path) -> None:
    before = data_digest(csv_cfg(csv_root), SRC)
    table = pd.read_csv(csv_root / "metadata.csv")
    relabelled = table.copy()
    relabelled.loc[0, "label"] = (relabelled.loc[0, "label"] + 1) % 3
    relabelled.to_csv(csv_root / "metadata.csv", index=False)
    assert changed(before, data_digest(csv_cfg(csv_root), SRC)) == ["train"]
    moved = table.copy()
    moved.loc[0, "split"] = "id_test"  # a train image moves to id_test
    moved.to_csv(csv_root / "metadata.csv", index=False)
    assert changed(before, data_digest(csv_cfg(csv_root), SRC)) == ["id_test", "train"]
    table.to_csv(csv_root / "metadata.csv", index=False)
    assert data_digest(csv_cfg(csv_root), SRC) == before


def test_renamed_classes_and_subsampling_move_it(csv_root: Path) -> None:
    before = data_digest(csv_cfg(csv_root), SRC)
    (csv_root / "classnames.txt").write_text("cat\ndog\nbird\n")
    assert data_digest(csv_cfg(csv_root), SRC).digest != before.digest
    sub = data_digest(csv_cfg(csv_root, subsample=4), SRC)
    assert {s.size for s in sub.splits.values()} == {4}


def test_a_moved_copy_keeps_its_digest_when_times_are_kept(csv_root: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(csv_root, tmp_path / "elsewhere" / "pets")  # copy2 keeps mtimes
    ours = data_digest(csv_cfg(csv_root), SRC)
    theirs = data_digest(csv_cfg(copy), SRC)
    assert theirs.digest == ours.digest and theirs.source != ours.source


def test_a_missing_file_is_named(csv_root: Path) -> None:
    (csv_root / "images" / "ood_test_0003.png").unlink()
    with pytest.raises(DataError, match="ood_test_0003.png"):
        data_digest(csv_cfg(csv_root), SRC)


def test_wilds_and_synthetic(wilds_root: Path) -> None:
    wilds = data_digest(DatasetConfig(name="iwildcam", root=str(wilds_root)), SRC)
    assert wilds.name == "iwildcam" and set(wilds.splits) == {
        "train", "id_val", "id_test", "ood_val", "ood_test"}
    assert wilds == data_digest(DatasetConfig(name="iwildcam", root=str(wilds_root)), SRC)
    synthetic = data_digest(DatasetConfig(name="synthetic", subsample=16), SRC)
    assert synthetic.source == "synthetic"
    assert synthetic == data_digest(DatasetConfig(name="synthetic", subsample=16), SRC)
    assert np.all([s.size == 16 for s in synthetic.splits.values()])
