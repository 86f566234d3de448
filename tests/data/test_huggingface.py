"""Hugging Face ``datasets`` DatasetDicts, written by the test with ``save_to_disk`` (and filed in
the library's hub cache), read by the real ``datasets`` library through the loader."""

from __future__ import annotations

import pickle
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from flyp_ray.config import DatasetConfig
from flyp_ray.data import load
from flyp_ray.data.digest import data_digest
from flyp_ray.errors import BadInput, ConfigError, DataError
from tests.support.own_data import dataset_dict, write_hub_cache, write_saved_dataset

SRC = "hf.yaml"


def cfg(root: str | Path, **kw: object) -> DatasetConfig:
    return DatasetConfig(name="huggingface", root=str(root), **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_saved_dataset(tmp_path_factory.mktemp("hf") / "pets")


def test_splits_classes_labels_and_pixels(saved: Path) -> None:
    data = load.load_data(cfg(saved), np.asarray, np.asarray, SRC)
    assert list(data.splits) == ["train", "id_val", "id_test"]  # validation -> id_val
    assert data.classnames == ["golden retriever", "tabby cat", "parrot"]  # ClassLabel order
    original = datasets.load_from_disk(str(saved))
    for ours, theirs in (("train", "train"), ("id_val", "validation")):
        split = data.splits[ours]
        assert split.labels.tolist() == original[theirs]["kind"]
        pixels, label, index = split.dataset[5]
        assert label == original[theirs][5]["kind"] and index == 5
        assert np.array_equal(pixels, np.asarray(original[theirs][5]["img"].convert("RGB")))


def test_the_reader_travels_to_loader_processes(saved: Path) -> None:
    source = load.load_sources(cfg(saved), SRC).sources["id_test"]
    again = pickle.loads(pickle.dumps(source.read))  # what a spawned DataLoader worker gets
    assert np.array_equal(np.asarray(again(3)), np.asarray(source.read(3)))


def test_named_columns_and_integer_labels(tmp_path: Path) -> None:
    data = dataset_dict()
    data = data.cast_column("kind", datasets.Value("int64"))  # type: ignore[attr-defined]
    data.save_to_disk(str(tmp_path / "ints"))
    names = tmp_path / "names.txt"
    names.write_text("dog\ncat\nbird\n")
    facts = load.inspect_data(cfg(tmp_path / "ints", label_column="kind",
                                  classnames=str(names)), SRC)
    assert facts.classnames == ("dog", "cat", "bird")
    with pytest.raises(ConfigError, match="dataset.label_column: .* one ClassLabel"):
        load.inspect_data(cfg(tmp_path / "ints"), SRC)


def test_two_image_columns_need_a_name(tmp_path: Path) -> None:
    data = dataset_dict()
    data = data.map(lambda row: {"thumb": row["img"]})  # type: ignore[attr-defined]
    data = data.cast_column("thumb", datasets.Image())
    data.save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ConfigError, match="dataset.image_column: .* it has 2: img, thumb"):
        load.inspect_data(cfg(tmp_path / "two"), SRC)
    facts = load.inspect_data(cfg(tmp_path / "two", image_column="thumb"), SRC)
    assert facts.splits["train"].size == 24
    with pytest.raises(ConfigError, match="dataset.image_column: 'caption' .* not an Image"):
        load.inspect_data(cfg(tmp_path / "two", image_column="caption"), SRC)


def test_refused_with_what_to_do(tmp_path: Path, saved: Path) -> None:
    cases = []
    odd = dataset_dict(per_split={"train": 2, "unsupervised": 1})
    odd.save_to_disk(str(tmp_path / "odd"))  # type: ignore[attr-defined]
    cases.append((tmp_path / "odd", "split 'unsupervised' is not a split"))
    one = dataset_dict()["train"]  # type: ignore[index]
    one.save_to_disk(str(tmp_path / "one"))
    cases.append((tmp_path / "one", "holds one Dataset, not a DatasetDict"))
    unlabelled = dataset_dict(per_split={"train": 2, "test": 1})
    unlabelled["test"] = unlabelled["test"].map(  # type: ignore[index]
        lambda row: {"kind": -1}, features=unlabelled["test"].features)  # type: ignore[index]
    unlabelled.save_to_disk(str(tmp_path / "unlabelled"))  # type: ignore[attr-defined]
    cases.append((tmp_path / "unlabelled", "[test]: row 0: label must be in 0..2, got -1"))
    (tmp_path / "plain").mkdir()
    cases.append((tmp_path / "plain", "is not a folder that DatasetDict.save_to_disk wrote"))
    for root, needle in cases:
        with pytest.raises(BadInput) as refused:
            load.inspect_data(cfg(root), SRC)
        assert needle in str(refused.value) and "\n" not in str(refused.value)


def test_an_undecodable_image_is_refused_at_validate(tmp_path: Path) -> None:
    data = dataset_dict(per_split={"train": 2, "validation": 1})
    features = data["train"].features.copy()  # type: ignore[index]
    features["img"] = datasets.Image(decode=False)
    broken = data["validation"].cast(features).map(  # type: ignore[index]
        lambda row, i: {"img": {"bytes": b"not a png" if i == 0 else row["img"]["bytes"],
                                "path": None}}, with_indices=True)
    data["validation"] = broken.cast_column("img", datasets.Image())  # type: ignore[index]
    data.save_to_disk(str(tmp_path / "broken"))  # type: ignore[attr-defined]
    with pytest.raises(DataError, match=r"cannot read image .*broken\[validation\]\[0\]"):
        load.inspect_data(cfg(tmp_path / "broken"), SRC)


def test_hub_name_from_the_local_cache_only(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    write_hub_cache(cache, "someorg/pets", tmp_path / "work")
    # HF_DATASETS_CACHE, as the library read it at import: where load_dataset looks
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    facts = load.inspect_data(cfg("someorg/pets"), SRC)
    assert facts.line.startswith("huggingface at someorg/pets: 3 splits (train 24, id_val 12")
    digest = data_digest(cfg("someorg/pets"), SRC)
    assert digest.source == "someorg/pets" and digest.name == "someorg/pets"
    with pytest.raises(DataError, match="'someorg/other' is not a folder, nor a data set in the "
                                        "local Hugging Face cache"):
        load.inspect_data(cfg("someorg/other"), SRC)
    assert datasets.config.HF_HUB_OFFLINE is False  # offline for the call only


def test_digest_same_data_same_digest_one_image_rewritten_another(tmp_path: Path) -> None:
    first = data_digest(cfg(write_saved_dataset(tmp_path / "a")), SRC)
    second = data_digest(cfg(write_saved_dataset(tmp_path / "b")), SRC)
    assert first.digest == second.digest and first.source != second.source
    data = dataset_dict()
    test = data["test"]  # type: ignore[index]
    rows = test.to_dict()
    rows["img"][2] = Image.new("RGB", (24, 24), (5, 5, 5))
    data["test"] = datasets.Dataset.from_dict(rows, features=test.features)  # type: ignore[index]
    data.save_to_disk(str(tmp_path / "c"))  # type: ignore[attr-defined]
    third = data_digest(cfg(tmp_path / "c"), SRC)
    assert [n for n in first.splits if first.splits[n] != third.splits[n]] == ["id_test"]
