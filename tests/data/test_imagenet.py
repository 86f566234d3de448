"""Tests of flyp_ray.data.imagenet on miniatures of each set's folder layout
(tests/support/imagenet_folder.py).

Everything goes through the real loader (``load.load_data`` / ``check_data``), the real
evaluation code (``evaluate.split_metrics`` / ``evaluate_splits``) and the real CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image
from torchvision.transforms import functional as TF

from flyp_ray import cli, config
from flyp_ray.config import OOD_SETS, DatasetConfig
from flyp_ray.data import base, imagenet, load
from flyp_ray.errors import ConfigError, DataError
from flyp_ray.finetune.evaluate import evaluate_splits, ood_averages, split_metrics, unwrap
from flyp_ray.finetune.model import load_model, tiny_config_path
from tests.support import REPO
from tests.support.configs import named, tiny_config, write_config  # noqa: E402
from tests.support.imagenet_folder import (  # noqa: E402 - the helpers live next to the tests
    IMAGENET,
    IMAGENET_A,
    IMAGENET_R,
    OBJECTNET,
    PER_CLASS,
    TRAIN_PER_CLASS,
    write_imagenet,
    write_shift_sets,
)

SRC = "imagenet.yaml"
ALL_SPLITS = ["train", "id_val", "id_test", *(f"ood_test/{s}" for s in OOD_SETS)]


def to_tensor(image: Image.Image) -> torch.Tensor:
    return TF.to_tensor(TF.resize(image, [8, 8]))


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder holding imagenet/ and the five shift sets next to it."""
    root = tmp_path_factory.mktemp("data")
    write_imagenet(root)
    write_shift_sets(root)
    return root


def cfg_for(layout: Path, **kw: Any) -> DatasetConfig:
    kw.setdefault("ood_sets", list(OOD_SETS))
    return DatasetConfig(name="imagenet", root=str(layout / "imagenet"), **kw)


def load_all(cfg: DatasetConfig) -> base.Data:
    return load.load_data(cfg, to_tensor, to_tensor, SRC)


def paths(split: base.Split) -> list[Path]:
    ds = split.dataset
    assert isinstance(ds, base.ImageDataset)
    return [ds.read.path(int(p)) for p in ds.positions]  # type: ignore[attr-defined]


# --- loading -------------------------------------------------------------------------------


def test_every_split_loads_with_its_classes_and_sizes(layout: Path) -> None:
    d = load_all(cfg_for(layout))
    assert list(d.splits) == ALL_SPLITS
    assert all(split.name == name for name, split in d.splits.items())
    assert d.classnames == list(IMAGENET_CLASSNAMES) and len(d.classnames) == 1000
    assert len(d.templates) == 80 and all("{}" in t for t in d.templates)
    n = len(IMAGENET)
    sizes = {name: len(split.labels) for name, split in d.splits.items()}
    assert sizes == {
        "train": n * (TRAIN_PER_CLASS - 1), "id_val": n, "id_test": n * PER_CLASS,
        "ood_test/imagenet_v2": n * PER_CLASS, "ood_test/imagenet_r": 2 * PER_CLASS,
        "ood_test/imagenet_a": 2 * PER_CLASS, "ood_test/imagenet_sketch": n * PER_CLASS,
        "ood_test/objectnet": len(OBJECTNET) * PER_CLASS,  # squeegee has no ImageNet class
    }
    standard = [label for _, label in IMAGENET]
    for name in ("train", "id_val", "id_test", "ood_test/imagenet_v2", "ood_test/imagenet_sketch"):
        assert sorted(set(d.splits[name].labels.tolist())) == standard, name
        assert d.splits[name].class_map is None
    # Labels follow the folders: the wnid's standard index (the V2 folder's number).
    for split in ("id_test", "ood_test/imagenet_sketch", "ood_test/imagenet_v2"):
        for path, label in zip(paths(d.splits[split]), d.splits[split].labels, strict=True):
            folder = path.parent.name
            expected = int(folder) if folder.isdigit() else imagenet.wnids().index(folder)
            assert label == expected
    item = d.splits["id_test"].dataset[0]
    assert item[0].shape == (3, 8, 8) and item[1:] == (0, 0)


def test_id_val_is_carved_from_train_disjoint_and_the_same_every_time(layout: Path) -> None:
    first, second = load_all(cfg_for(layout)), load_all(cfg_for(layout))
    train, id_val = set(paths(first.splits["train"])), set(paths(first.splits["id_val"]))
    assert not train & id_val
    everything = {p for p in (layout / "imagenet" / "train").rglob("*.JPEG")}
    assert train | id_val == everything
    assert {p.parent.name for p in id_val} == {w for w, _ in IMAGENET}  # every class gives one
    assert paths(second.splits["id_val"]) == paths(first.splits["id_val"])
    assert all(p.parent.parent.name == "train" for p in id_val)


def test_the_shift_sets_with_fewer_classes_carry_their_class_maps(layout: Path) -> None:
    d = load_all(cfg_for(layout))
    for name, members, size in (("imagenet_r", IMAGENET_R, 200), ("imagenet_a", IMAGENET_A, 200)):
        split = d.splits[f"ood_test/{name}"]
        class_map = split.class_map
        assert class_map is not None and class_map.shape == (1000,)
        assert int((class_map >= 0).sum()) == size and int(class_map.max()) == size - 1
        ours = imagenet.wnids(name)
        for path, label in zip(paths(split), split.labels.tolist(), strict=True):
            assert ours[label] == path.parent.name  # the label is the set's own class
        for wnid, standard in members:
            assert int(class_map[standard]) == ours.index(wnid)
    objectnet = d.splits["ood_test/objectnet"]
    assert objectnet.class_map is not None
    assert int(objectnet.class_map.max()) == len(OBJECTNET) - 1
    for k, (_, _, ids) in enumerate(OBJECTNET.values()):  # sorted folders: alarm_clock, ...
        assert [int(objectnet.class_map[i]) for i in ids] == [k] * len(ids)
    assert int((objectnet.class_map >= 0).sum()) == 4  # two clocks, a banana, a lemon
    assert {p.parent.name for p in paths(objectnet)} == set(OBJECTNET)


def test_objectnet_images_lose_their_border(layout: Path) -> None:
    d = load.load_data(cfg_for(layout, ood_sets=["objectnet"]), lambda im: im.size,
                       lambda im: im.size, SRC)
    assert d.splits["ood_test/objectnet"].dataset[0][0] == (16, 12)  # written 20 x 16
    assert d.splits["id_test"].dataset[0][0] == (12, 10)  # other sets keep every pixel


def test_loading_lists_files_and_decodes_none(tmp_path: Path) -> None:
    root = write_imagenet(tmp_path)
    broken = root / "val" / "n01440764" / "ILSVRC2012_val_00000001.JPEG"
    broken.write_bytes(b"not a jpeg")
    d = load_all(DatasetConfig(name="imagenet", root=str(root)))  # no error: nothing decoded yet
    assert list(d.splits) == ["train", "id_val", "id_test"]
    with pytest.raises(DataError, match="ILSVRC2012_val_00000001.JPEG"):
        d.splits["id_test"].dataset[0]


def test_subsample_limits_every_split(layout: Path) -> None:
    d = load_all(cfg_for(layout, subsample=3))
    assert all(len(split.labels) == 3 for split in d.splits.values())
    assert d.splits["ood_test/imagenet_r"].class_map is not None  # kept through subsampling


def test_shipped_class_lists_are_the_standard_ones() -> None:
    from timm.data import ImageNetInfo

    ours = imagenet.wnids()
    assert ours == ImageNetInfo("imagenet-1k").label_names() == sorted(ours)
    assert len(ours) == len(IMAGENET_CLASSNAMES) == 1000
    for subset in ("imagenet_r", "imagenet_a"):
        members = imagenet.wnids(subset)
        assert len(members) == 200 and members == sorted(members) and set(members) <= set(ours)


# --- scoring on each set's own classes -----------------------------------------------------


def scores(split: base.Split, right: float, wrong: float) -> torch.Tensor:
    """Logits: per item, ``right`` for an ImageNet class of its label, ``wrong`` for the tench
    (class 0, a member of no set with a class map)."""
    assert split.class_map is not None
    logits = torch.zeros(len(split.labels), 1000)
    for row, label in enumerate(split.labels.tolist()):
        logits[row, torch.nonzero(split.class_map == label)[-1]] = right
        logits[row, 0] = wrong
    return logits


def test_imagenet_r_and_a_are_scored_on_their_200_classes(layout: Path) -> None:
    d = load_all(cfg_for(layout))
    for name in ("imagenet_r", "imagenet_a"):
        split = d.splits[f"ood_test/{name}"]
        assert split.class_map is not None and int(split.class_map[0]) == -1
        indices = torch.arange(len(split.labels))
        logits = scores(split, right=5.0, wrong=10.0)
        assert logits.argmax(1).eq(0).all()  # the tench wins over the 1000 classes ...
        # ... but is none of the set's classes: on its 200, every item is right.
        assert split_metrics(split, logits, indices)[f"ood_test/{name}/acc"] == 1.0
        other = 1 - int(split.labels[0])  # the set's other class in the miniature
        logits[0] = 0.0
        logits[0, torch.nonzero(split.class_map == other)[0]] = 3.0
        n = len(split.labels)
        assert split_metrics(split, logits, indices)[f"ood_test/{name}/acc"] == (n - 1) / n


def test_objectnet_scores_a_class_by_its_best_imagenet_class(layout: Path) -> None:
    split = load_all(cfg_for(layout, ood_sets=["objectnet"])).splits["ood_test/objectnet"]
    labels = split.labels.tolist()
    assert labels == [0, 0, 1, 1, 2, 2]  # alarm_clock, banana, lemon
    logits = torch.zeros(len(labels), 1000)
    logits[:, 0] = 20.0  # tench: not an ObjectNet class, ignored
    logits[0, 530] = 9.0  # digital clock: an alarm clock, right
    logits[0, 954] = 8.0
    logits[1, 409] = 2.0  # analog clock: right, as the best of the set's classes
    logits[2, 954] = 4.0  # banana, right
    logits[3, 951] = 4.0  # lemon for a banana: wrong
    logits[3, 954] = 3.0
    logits[4, 951] = 1.0  # lemon, right
    logits[5, 409] = 1.0  # a clock for a lemon: wrong
    metrics = split_metrics(split, logits, torch.arange(len(labels)))
    assert metrics["ood_test/objectnet/acc"] == pytest.approx(4 / 6)
    assert set(metrics) >= {"ood_test/objectnet/macro_f1", "ood_test/objectnet/loss"}


def test_ood_average_covers_the_ood_sets_and_never_an_id_split(layout: Path) -> None:
    tiny = load_model(config.ModelConfig(arch=str(tiny_config_path()), pretrained=None))
    d = load.load_data(cfg_for(layout, subsample=4), tiny.preprocess_eval, tiny.preprocess_eval,
                       SRC)
    width = unwrap(tiny.model).text_projection.shape[1]
    head = torch.nn.functional.normalize(torch.randn(width, 1000, generator=torch.Generator()
                                                     .manual_seed(0)), dim=0)
    evaluated = [s for name, s in d.splits.items() if name != "train"]
    metrics = evaluate_splits(tiny.model, head, evaluated, batch_size=8,
                              device=torch.device("cpu"), precision="fp32")
    for name in ("acc", "macro_f1", "loss"):
        per_set = [metrics[f"ood_test/{s}/{name}"] for s in OOD_SETS]
        assert metrics[f"ood_test/{name}"] == pytest.approx(sum(per_set) / len(per_set))
    assert "id_test/acc" in metrics and "ood_test/id_test/acc" not in metrics
    # The average is over OOD splits only, whatever else is in the metrics.
    assert ood_averages({"id_test/acc": 1.0, "ood_test/a/acc": 0.2, "ood_test/b/acc": 0.4,
                         "ood_test/b/extra": 1.0}, ["ood_test/a", "ood_test/b"]) == {
        "ood_test/acc": pytest.approx(0.3)}


# --- config and validate -------------------------------------------------------------------


def config_file(tmp: Path, layout: Path, **dataset: Any) -> Path:
    raw = tiny_config(tmp, dataset={"name": "imagenet", "root": str(layout / "imagenet"),
                                    "ood_sets": list(OOD_SETS), **dataset},
                      train={"batch_size": 4})  # the miniature has 12 training images
    return write_config(tmp / "imagenet.yaml", raw)


def test_validate_accepts_the_config_when_the_data_is_there(
        layout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(config_file(tmp_path, layout))]) == 0
    out = capsys.readouterr().out
    assert f"imagenet at {layout / 'imagenet'}: 8 splits (train 12, id_val 3, id_test 6" in out
    assert "ood_test/objectnet 6), 1000 classes" in out


@pytest.mark.parametrize("missing", ["imagenet/val", "imagenet-r", "objectnet-1.0/mappings"])
def test_validate_names_the_missing_path(missing: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    layout = tmp_path / "data"
    write_imagenet(layout)
    write_shift_sets(layout)
    target = layout / missing
    for path in sorted(target.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    target.rmdir()
    assert cli.main(["validate", str(config_file(tmp_path, layout))]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "dataset." in err and "Traceback" not in err


def test_ood_root_points_elsewhere(layout: Path, tmp_path: Path) -> None:
    root = write_imagenet(tmp_path)  # no shift sets next to this one
    with pytest.raises(DataError, match=str(tmp_path / "sketch")):
        load.check_data(DatasetConfig(name="imagenet", root=str(root),
                                      ood_sets=["imagenet_sketch"]), SRC)
    cfg = DatasetConfig(name="imagenet", root=str(root), ood_sets=["imagenet_sketch"],
                        ood_root=str(layout))
    assert "ood_test/imagenet_sketch 6" in load.check_data(cfg, SRC)


def test_a_flat_val_folder_is_refused_with_a_hint(tmp_path: Path) -> None:
    root = write_imagenet(tmp_path)
    for path in (root / "val").rglob("*.JPEG"):
        path.rename(root / "val" / path.name)
    for folder in (root / "val").iterdir():
        if folder.is_dir():
            folder.rmdir()
    with pytest.raises(DataError, match=r"val has no class folders .*class folders val/<wnid>/"):
        load.check_data(DatasetConfig(name="imagenet", root=str(root)), SRC)


def test_a_folder_outside_the_class_list_is_named(layout: Path, tmp_path: Path) -> None:
    root = write_imagenet(tmp_path)
    (tmp_path / "imagenet-r" / "n01440764").mkdir(parents=True)  # tench: not in ImageNet-R
    Image.new("RGB", (4, 4)).save(tmp_path / "imagenet-r" / "n01440764" / "a.jpg")
    with pytest.raises(DataError, match="n01440764 is not one of ImageNet-R's 200 class"):
        load.check_data(DatasetConfig(name="imagenet", root=str(root),
                                      ood_sets=["imagenet_r"]), SRC)


@pytest.mark.parametrize(("dataset", "train", "key", "problem"), [
    ({"name": "imagenet", "ood_sets": ["imagenet_c"]}, {}, "dataset.ood_sets[0]",
     ("must be one of imagenet_v2 | imagenet_r | imagenet_a | imagenet_sketch | objectnet, "
      "got 'imagenet_c'")),
    ({"name": "csv", "ood_sets": ["imagenet_r"]}, {}, "dataset.ood_sets",
     "is for dataset imagenet only"),
    ({"name": "imagenet", "ood_sets": ["imagenet_r", "imagenet_r"]}, {}, "dataset.ood_sets",
     "names imagenet_r twice"),
    ({"name": "imagenet", "ood_root": "/data"}, {}, "dataset.ood_root",
     "only read with dataset.ood_sets"),
    ({"name": "imagenet", "ood_sets": ["imagenet_r"]}, {"eval_splits": ["id_val", "ood_test"]},
     "train.eval_splits", "must name splits of this data set"),
    ({"name": "imagenet", "ood_sets": ["imagenet_r"]},
     {"eval_splits": ["id_val", "ood_test/objectnet"]}, "train.eval_splits",
     "names ood_test/objectnet"),
])
def test_config_refuses_bad_ood_settings(dataset: dict[str, Any], train: dict[str, Any],
                                         key: str, problem: str) -> None:
    raw = named({"dataset": {"root": "/data/imagenet", **dataset}, "train": train})
    with pytest.raises(ConfigError) as err:
        config.from_dict(raw, SRC)
    assert err.value.key == key and problem in err.value.problem


def test_eval_splits_must_hold_every_set_the_search_metric_averages() -> None:
    raw: dict[str, Any] = named({
        "dataset": {"name": "imagenet", "root": "/d", "ood_sets": ["imagenet_r", "objectnet"]},
        "train": {"eval_splits": ["id_val", "ood_test/imagenet_r"]},
        "search": {"metric": "ood_test/acc"}})
    with pytest.raises(ConfigError, match="must include ood_test/objectnet"):
        config.from_dict(raw, SRC)
    raw["search"]["metric"] = "ood_test/imagenet_r/acc"
    assert config.from_dict(raw, SRC).train.eval_splits == ["id_val", "ood_test/imagenet_r"]


def test_the_shipped_search_space_reads_every_shift_set(layout: Path) -> None:
    # Its training values are FLYP's ImageNet ones: tests/test_yaml_files.py's table checks them.
    path = REPO / "search_spaces" / "imagenet.yaml"
    cfg = config.load(path, [f"dataset.root={layout / 'imagenet'}"])
    assert cfg.dataset.templates == "imagenet" and cfg.dataset.ood_sets == list(OOD_SETS)
    # With ood_root null the shift sets are read next to root: the miniature validates.
    assert "ood_test/objectnet 6), 1000 classes" in load.check_data(cfg.dataset, cfg.source)
