"""Tests of flyp_ray.data and flyp_ray.data.synthetic on folders written by
tests/support/wilds_folder.py.

The WILDS tests run the real ``wilds.get_dataset`` loader on small WILDS-format folders.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from flyp_ray.config import SPLITS, DatasetConfig
from flyp_ray.data import base, load, synthetic, wilds
from flyp_ray.data.prompts import TEMPLATES
from flyp_ray.errors import ConfigError, DataError
from tests.support.wilds_folder import (  # noqa: E402 - the helpers live next to the tests
    write_csv_dataset,
    write_iwildcam,
)

SRC = "cfg.yaml"


def to_tensor(image: Image.Image) -> torch.Tensor:
    return TF.to_tensor(image)


def train_marker(image: Image.Image) -> tuple[str, tuple[int, int]]:
    return ("train", image.size)


def eval_marker(image: Image.Image) -> tuple[str, tuple[int, int]]:
    return ("eval", image.size)


def load_all(cfg: DatasetConfig) -> base.Data:
    return load.load_data(cfg, to_tensor, to_tensor, SRC)


@pytest.fixture()
def csv_root(tmp_path: Path) -> Path:
    return write_csv_dataset(tmp_path / "csvset", n_per_split=6, num_classes=3)


def csv_cfg(root: Path, **kw: Any) -> DatasetConfig:
    return DatasetConfig(name="csv", root=str(root), classnames=str(root / "classnames.txt"), **kw)


# --- WILDS: iWildCam -----------------------------------------------------------------------


def test_iwildcam_splits_are_mapped_to_our_names(wilds_root: Path) -> None:
    d = load_all(DatasetConfig(name="iwildcam", root=str(wilds_root)))
    assert list(d.splits) == list(SPLITS)
    assert all(split.name == name for name, split in d.splits.items())
    assert d.classnames == [
        "empty", "White-lipped peccary", "Central American agouti", "Lowland paca",
    ]
    assert d.templates == ["a photo of {}.", "{} in the wild."]


def test_iwildcam_labels_and_groups_come_from_the_metadata(wilds_root: Path) -> None:
    d = load_all(DatasetConfig(name="iwildcam", root=str(wilds_root)))
    table = pd.read_csv(wilds_root / "iwildcam_v2.0" / "metadata.csv")
    theirs = {"train": "train", "id_val": "id_val", "id_test": "id_test",
              "ood_val": "val", "ood_test": "test"}
    for ours, split in d.splits.items():
        rows = table[table["split"] == theirs[ours]]
        assert split.labels.dtype == torch.int64
        assert split.labels.tolist() == rows["y"].tolist()
        assert split.groups is not None
        assert split.groups.tolist() == rows["location_remapped"].tolist()
    # WILDS' OOD splits come from camera traps the training split never saw.
    assert set(d.splits["ood_val"].groups.tolist()) == {3, 4}
    assert set(d.splits["ood_test"].groups.tolist()) == {5, 6}
    assert set(d.splits["train"].groups.tolist()) == {0, 1, 2}


def test_iwildcam_items_are_image_label_index(wilds_root: Path) -> None:
    cfg = DatasetConfig(name="iwildcam", root=str(wilds_root))
    d = load.load_data(cfg, train_marker, eval_marker, SRC)
    train, test = d.splits["train"], d.splits["ood_test"]
    assert train.dataset[5] == (("train", (32, 32)), int(train.labels[5]), 5)
    assert test.dataset[2] == (("eval", (32, 32)), int(test.labels[2]), 2)
    assert len(d.splits["id_val"].dataset) == 8


def test_iwildcam_images_carry_the_class(wilds_root: Path) -> None:
    """A nearest-centroid rule on raw pixels, fit on train, must work on the OOD test split."""
    d = load_all(DatasetConfig(name="iwildcam", root=str(wilds_root)))

    def features(split: base.Split) -> torch.Tensor:
        centres = [split.dataset[i][0][:, 12:20, 12:20] for i in range(len(split.dataset))]
        return torch.stack([c.mean(dim=(1, 2)) for c in centres])

    train, test = d.splits["train"], d.splits["ood_test"]
    x, y = features(train), train.labels
    centroids = torch.stack([x[y == c].mean(0) for c in range(4)])
    predicted = torch.cdist(features(test), centroids).argmin(1)
    assert (predicted == test.labels).float().mean() == 1.0


def test_iwildcam_official_eval_is_wilds_eval(wilds_root: Path) -> None:
    d = load_all(DatasetConfig(name="iwildcam", root=str(wilds_root)))
    split = d.splits["ood_test"]
    assert split.official_eval is not None
    indices = torch.arange(len(split.labels))
    perfect = split.official_eval(split.labels.clone(), split.labels, indices)
    assert set(perfect) == {"acc_avg", "recall-macro_all", "F1-macro_all"}
    assert all(type(v) is float for v in perfect.values())
    assert perfect["acc_avg"] == 1.0
    wrong = split.labels.clone()
    wrong[:2] = (wrong[:2] + 1) % 4
    assert split.official_eval(wrong, split.labels, indices)["acc_avg"] == pytest.approx(6 / 8)


def test_missing_wilds_root_names_the_expected_folder_and_creates_nothing(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    cfg = DatasetConfig(name="iwildcam", root=str(root))
    for call in (lambda: load_all(cfg), lambda: load.check_data(cfg, SRC)):
        with pytest.raises(DataError) as info:
            call()
        message = str(info.value)
        assert str(root / "iwildcam_v2.0") in message
        assert "cfg.yaml" in message and "dataset.root" in message and "\n" not in message
    assert not root.exists()  # WILDS would have created it before looking


def test_wilds_folder_without_release_file_is_named(tmp_path: Path) -> None:
    folder = write_iwildcam(tmp_path, n_per_split=4, num_classes=2)
    (folder / "RELEASE_v2.0.txt").unlink()
    with pytest.raises(DataError, match="RELEASE_v2.0.txt"):
        load_all(DatasetConfig(name="iwildcam", root=str(tmp_path)))


def test_malformed_wilds_metadata_is_a_data_error(tmp_path: Path) -> None:
    folder = write_iwildcam(tmp_path, n_per_split=4, num_classes=2)
    table = pd.read_csv(folder / "metadata.csv")
    table.loc[0, "split"] = "holdout"
    table.to_csv(folder / "metadata.csv", index=False)
    with pytest.raises(DataError) as info:
        load_all(DatasetConfig(name="iwildcam", root=str(tmp_path)))
    assert str(folder) in str(info.value) and "holdout" in str(info.value)


def test_wilds_root_is_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dataset.root"):
        load_all(DatasetConfig(name="iwildcam", root=None))


def test_corrupt_wilds_image_names_the_file(tmp_path: Path) -> None:
    folder = write_iwildcam(tmp_path, n_per_split=4, num_classes=2)
    image_file = folder / "train" / "train_0001.jpg"
    # Cut in half: PIL still opens it, and only decoding the pixels fails.
    image_file.write_bytes(image_file.read_bytes()[: image_file.stat().st_size // 2])
    d = load_all(DatasetConfig(name="iwildcam", root=str(tmp_path)))
    d.splits["train"].dataset[0]  # an intact neighbour still reads
    with pytest.raises(DataError, match="train_0001.jpg"):
        d.splits["train"].dataset[1]


def test_check_data_describes_a_wilds_folder(wilds_root: Path) -> None:
    line = load.check_data(DatasetConfig(name="iwildcam", root=str(wilds_root)), SRC)
    assert line.startswith(f"iwildcam at {wilds_root / 'iwildcam_v2.0'}: 5 splits")
    assert line.endswith("4 classes") and "\n" not in line


def test_check_data_finds_a_missing_image(tmp_path: Path) -> None:
    folder = write_iwildcam(tmp_path, n_per_split=4, num_classes=2)
    (folder / "train" / "val_0000.jpg").unlink()
    with pytest.raises(DataError, match="val_0000.jpg"):
        load.check_data(DatasetConfig(name="iwildcam", root=str(tmp_path)), SRC)


def test_check_data_with_download_does_not_download(tmp_path: Path) -> None:
    line = load.check_data(DatasetConfig(name="iwildcam", root=str(tmp_path), download=True), SRC)
    assert "to be downloaded" in line
    assert list(tmp_path.iterdir()) == []


# --- WILDS: FMoW and Camelyon17 ------------------------------------------------------------


def test_fmow_uses_regions_as_groups_and_reports_worst_region(wilds_root: Path) -> None:
    d = load_all(DatasetConfig(name="fmow", root=str(wilds_root)))
    assert list(d.splits) == list(SPLITS)
    assert len(d.classnames) == 62 and d.classnames[0] == "airport"
    assert d.splits["train"].labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    split = d.splits["ood_test"]
    assert split.groups is not None and len(set(split.groups.tolist())) == 5
    wrong = split.labels.clone()
    wrong[0] = 61
    results = split.official_eval(wrong, split.labels, torch.arange(8))  # type: ignore[misc]
    assert results["acc_avg"] == pytest.approx(7 / 8)
    assert results["acc_worst_region"] < 1.0 and "acc_worst_year" in results


def test_camelyon17_has_no_id_test_and_groups_by_hospital(wilds_root: Path) -> None:
    d = load_all(DatasetConfig(name="camelyon17", root=str(wilds_root)))
    assert list(d.splits) == ["train", "id_val", "ood_val", "ood_test"]
    assert d.classnames == ["lymph node", "lymph node containing metastatic tumor tissue"]
    assert set(d.splits["ood_val"].groups.tolist()) == {1}  # type: ignore[union-attr]
    assert set(d.splits["ood_test"].groups.tolist()) == {2}  # type: ignore[union-attr]


def test_official_eval_follows_indices_after_subsampling(wilds_root: Path) -> None:
    """The index an item carries must pick that item's own WILDS metadata row."""
    import wilds

    cfg = DatasetConfig(name="fmow", root=str(wilds_root), subsample=5)
    split = load_all(cfg).splits["ood_test"]
    kept = base.subsample_positions(8, 5)
    assert not np.array_equal(kept, np.arange(5))  # else this test could not tell the rows apart
    indices = torch.tensor([split.dataset[i][2] for i in range(5)])
    wrong = split.labels.clone()
    wrong[::2] = 60
    ours = split.official_eval(wrong, split.labels, indices)  # type: ignore[misc]
    reference = wilds.get_dataset("fmow", root_dir=str(wilds_root)).get_subset("test")
    theirs, _ = reference.eval(wrong, split.labels, reference.metadata_array[torch.as_tensor(kept)])
    assert ours == {k: float(v) for k, v in theirs.items()}
    assert ours["acc_avg"] == pytest.approx(2 / 5)


def test_wilds_group_means_match_a_direct_computation() -> None:
    v = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    g = torch.tensor([0, 0, 2, 2, 2])
    means, counts = wilds._avg_over_groups(v, g, 4)
    assert means.tolist() == pytest.approx([0.5, 0.0, 2 / 3, 0.0])
    assert counts.tolist() == [2.0, 0.0, 3.0, 0.0]


# --- csv -----------------------------------------------------------------------------------


def test_csv_loads_splits_labels_groups_and_names(csv_root: Path) -> None:
    d = load_all(csv_cfg(csv_root))
    assert list(d.splits) == list(SPLITS)
    assert d.classnames == ["thing 0", "thing 1", "thing 2"]
    assert d.templates == ["a photo of a {}."]
    train = d.splits["train"]
    assert train.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert train.groups is not None and train.groups.tolist() == [0, 1, 0, 1, 0, 1]
    assert d.splits["ood_test"].groups.tolist() == [2, 3, 2, 3, 2, 3]  # type: ignore[union-attr]
    assert train.official_eval is None
    image, label, index = train.dataset[4]
    assert image.shape == (3, 32, 32) and label == 1 and index == 4


def test_csv_without_group_column_has_no_groups(tmp_path: Path) -> None:
    root = write_csv_dataset(tmp_path, n_per_split=3, splits=("train", "id_val"), groups=False)
    d = load_all(csv_cfg(root))
    assert list(d.splits) == ["train", "id_val"]
    assert d.splits["train"].groups is None


def test_csv_named_groups_are_numbered(csv_root: Path) -> None:
    table = pd.read_csv(csv_root / "metadata.csv")
    table["group"] = ["site b" if i % 2 else "site a" for i in range(len(table))]
    table.to_csv(csv_root / "metadata.csv", index=False)
    groups = load_all(csv_cfg(csv_root)).splits["train"].groups
    assert groups is not None and groups.tolist() == [0, 1, 0, 1, 0, 1]


def test_csv_needs_class_names(csv_root: Path) -> None:
    with pytest.raises(ConfigError, match="dataset.classnames"):
        load_all(DatasetConfig(name="csv", root=str(csv_root)))


def _edit_csv(root: Path, row: int, column: str, value: Any) -> None:
    table = pd.read_csv(root / "metadata.csv", dtype=str)
    table.loc[row, column] = value
    table.to_csv(root / "metadata.csv", index=False)


@pytest.mark.parametrize("column,value,expected", [
    ("split", "validation", "line 5: split must be one of.*'validation'"),
    ("label", "3", "line 5: label must be in 0..2.*got 3"),
    ("label", "-1", "line 5: label must be in 0..2.*got -1"),
    ("label", "cat", "line 5: label must be an integer, got 'cat'"),
    ("filepath", "", "line 5: empty value"),
])
def test_csv_bad_values_name_file_line_and_value(
    csv_root: Path, column: str, value: str, expected: str
) -> None:
    _edit_csv(csv_root, 3, column, value)
    with pytest.raises(DataError, match=expected) as info:
        load_all(csv_cfg(csv_root))
    assert str(csv_root / "metadata.csv") in str(info.value)


def test_csv_missing_column_is_named(csv_root: Path) -> None:
    table = pd.read_csv(csv_root / "metadata.csv").drop(columns=["split"])
    table.to_csv(csv_root / "metadata.csv", index=False)
    with pytest.raises(DataError, match="missing column 'split'"):
        load_all(csv_cfg(csv_root))


def test_csv_missing_root_and_metadata_are_named(tmp_path: Path, csv_root: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "absent")):
        load_all(csv_cfg(tmp_path / "absent"))
    with pytest.raises(DataError, match="dataset.metadata.*other.csv"):
        load_all(csv_cfg(csv_root, metadata="other.csv"))


def test_csv_corrupt_image_names_the_file(csv_root: Path) -> None:
    (csv_root / "images" / "train_0002.png").write_bytes(b"\x89PNG garbage")
    d = load_all(csv_cfg(csv_root))
    with pytest.raises(DataError, match="train_0002.png"):
        d.splits["train"].dataset[2]


def test_csv_missing_image_is_found_by_check_data(csv_root: Path) -> None:
    assert load.check_data(csv_cfg(csv_root), SRC).startswith("csv at ")
    (csv_root / "images" / "id_test_0000.png").unlink()
    with pytest.raises(DataError, match="id_test_0000.png"):
        load.check_data(csv_cfg(csv_root), SRC)


def test_csv_split_works_with_a_multiprocess_dataloader(csv_root: Path) -> None:
    split = load_all(csv_cfg(csv_root)).splits["train"]
    loader = torch.utils.data.DataLoader(split.dataset, batch_size=4, num_workers=2)
    images, labels, indices = next(iter(loader))
    assert images.shape == (4, 3, 32, 32)
    assert labels.tolist() == split.labels[:4].tolist() and indices.tolist() == [0, 1, 2, 3]


# --- subsampling ---------------------------------------------------------------------------


def test_subsample_is_a_stable_sorted_subset() -> None:
    first = base.subsample_positions(1000, 50)
    assert len(first) == 50 and len(set(first.tolist())) == 50
    assert (np.diff(first) > 0).all() and first.max() < 1000
    assert np.array_equal(first, base.subsample_positions(1000, 50))
    assert not np.array_equal(first, np.arange(50))  # random, not the head of the split
    assert np.array_equal(base.subsample_positions(30, 50), np.arange(30))


def test_subsample_applies_to_every_split_and_repeats() -> None:
    cfg = DatasetConfig(name="synthetic", subsample=40)
    first, second = load_all(cfg), load_all(cfg)
    for name in SPLITS:
        assert len(first.splits[name].dataset) == 40
        assert torch.equal(first.splits[name].labels, second.splits[name].labels)
        assert torch.equal(first.splits[name].dataset[7][0], second.splits[name].dataset[7][0])


# --- synthetic -----------------------------------------------------------------------------


def test_synthetic_has_five_splits_of_the_default_sizes() -> None:
    d = load_all(DatasetConfig(name="synthetic"))
    assert list(d.splits) == list(SPLITS)
    assert {n: len(s.dataset) for n, s in d.splits.items()} == synthetic.SPLIT_SIZES
    assert d.classnames == list(synthetic.CLASSNAMES)
    assert d.templates == list(TEMPLATES["synthetic"])
    train = d.splits["train"]
    assert set(train.labels.tolist()) == set(range(len(synthetic.CLASSNAMES)))
    image, label, index = train.dataset[3]
    assert image.shape == (3, 64, 64) and label == int(train.labels[3]) and index == 3


def test_synthetic_is_deterministic_and_seeded() -> None:
    a = np.asarray(synthetic.image("train", 17))
    assert np.array_equal(a, np.asarray(synthetic.image("train", 17)))
    assert not np.array_equal(a, np.asarray(synthetic.image("train", 18)))
    assert not np.array_equal(a, np.asarray(synthetic.image("train", 17, seed=1)))
    assert not np.array_equal(a, np.asarray(synthetic.image("id_val", 17)))


def test_synthetic_image_shows_the_drawn_shape() -> None:
    for index in range(30):
        d = synthetic.draw("ood_test", index)
        pixels = np.asarray(synthetic.image("ood_test", index))
        assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
        shape_pixels = (pixels == synthetic.COLOURS[d.colour]).all(axis=2).sum()
        assert shape_pixels > 40, (index, synthetic.CLASSNAMES[d.label])


def test_synthetic_classes_differ_in_shape() -> None:
    """A ring is a circle with a hole: at equal radius it covers clearly fewer pixels."""
    circle = synthetic.Draw(label=0, background=0, colour="red", cx=0.5, cy=0.5, radius=0.3,
                            angle=0.0, tone=0.0, noise_seed=0)
    masks = {name: synthetic._shape_mask(name, circle, 64).sum() for name in synthetic.CLASSNAMES}
    assert masks["ring"] < 0.75 * masks["circle"]
    assert len(set(masks.values())) == len(masks)


def test_synthetic_ood_backgrounds_differ_from_id() -> None:
    def corner_brightness(split: str) -> float:
        corners = [np.asarray(synthetic.image(split, i))[:4, :4].mean() for i in range(100)]
        return float(np.mean(corners))

    assert corner_brightness("train") > 180
    assert corner_brightness("id_test") > 180
    assert corner_brightness("ood_test") < 110
    groups_id = set(synthetic.ShapesSplit("train").groups().tolist())
    groups_ood = set(synthetic.ShapesSplit("ood_val").groups().tolist())
    assert groups_id == set(synthetic.ID_BACKGROUNDS)
    assert groups_ood == set(synthetic.OOD_BACKGROUNDS)


def test_synthetic_groups_are_background_styles_in_the_split() -> None:
    split = load_all(DatasetConfig(name="synthetic", subsample=100)).splits["ood_test"]
    assert split.groups is not None and set(split.groups.tolist()) == {2, 3}


def test_synthetic_caption_describes_the_image() -> None:
    for index in range(20):
        d = synthetic.draw("ood_val", index)
        text = synthetic.caption("ood_val", index)
        assert text.startswith(("a ", "an "))
        assert synthetic.CLASSNAMES[d.label] in text and d.colour in text
        assert text.endswith(f"on a {synthetic.BACKGROUNDS[d.background]} background")
    assert synthetic.ShapesSplit("train").caption(3) == synthetic.caption("train", 3)


def test_synthetic_split_pickles() -> None:
    split = load_all(DatasetConfig(name="synthetic", subsample=8)).splits["id_val"]
    clone = pickle.loads(pickle.dumps(split.dataset))
    assert torch.equal(clone[3][0], split.dataset[3][0])


def test_unknown_synthetic_split_is_refused() -> None:
    with pytest.raises(ValueError, match="holdout"):
        synthetic.image("holdout", 0)
