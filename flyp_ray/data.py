"""Data sets as splits of ``(image, label, index)`` items, plus their class names and templates.

Several kinds of source, one shape of result:

- ``iwildcam``, ``fmow``, ``camelyon17``: WILDS' own loader (``wilds.get_dataset``) on the user's
  folder, never a download unless ``dataset.download`` is true. WILDS' ``val``/``test`` are the
  out-of-distribution splits and become ``ood_val``/``ood_test``; ``Split.official_eval`` runs
  WILDS' ``dataset.eval`` so that reported numbers match the benchmark's.
- ``csv``: ``<root>/<metadata>`` with columns ``filepath,label,split[,group]`` and a class-name
  file: any image set.
- ``synthetic``: :mod:`flyp_ray.synthetic`, generated on the fly.
- ``imagenet``: ILSVRC-2012's class folders, with ImageNetV2, -R, -A, -Sketch and ObjectNet as
  ``ood_test/<set>`` splits (:mod:`flyp_ray.imagenet`).
- ``caltech101``, ``stanford_cars``, ``flowers102``, ``pcam``, ``rendered_sst2``: torchvision's
  classes on the user's files (:mod:`flyp_ray.transfer`), ``id_*`` splits only.

The ``index`` of an item is its position in its split (after subsampling); the evaluation code
hands those indices back to ``official_eval``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from flyp_ray import cache, prompts, synthetic
from flyp_ray.config import SPLITS, DatasetConfig
from flyp_ray.errors import ConfigError, DataError

Transform = Callable[[Image.Image], Any]
OfficialEval = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, float]]

SUBSAMPLE_SEED = 0  # fixed, so that a subsampled split is the same in every trial and worker


@dataclasses.dataclass(frozen=True)
class Split:
    """One split, ready for a DataLoader."""

    name: str  # one of config.SPLITS, or ood_test/<set> for one of ImageNet's shift sets
    dataset: torch.utils.data.Dataset  # item: (image after transform, label: int, index: int)
    labels: torch.Tensor  # int64 [N], the label of each item
    groups: torch.Tensor | None  # int64 [N] group id of each item, None if the data set has none
    # (y_pred, y_true, indices into this split) -> WILDS' own dataset.eval results (floats);
    # None if not WILDS
    official_eval: OfficialEval | None
    # Run on each batch after its copy to the device; set when the items are cached uint8
    # pixels (dataset.cache), None when they are ready as they come.
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None
    # int64 [model classes]: the split's class of each model class, -1 for classes it lacks;
    # labels are the split's classes. Evaluation takes each split class's highest logit
    # (ImageNet-R/A: a 200-class subset; ObjectNet: several ImageNet classes per class).
    # None: labels are model classes.
    class_map: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class Data:
    """A loaded data set: what the prompts say and what the images are."""

    classnames: list[str]
    templates: list[str]
    splits: dict[str, Split]  # in SPLITS order, only those the data set has


class ImageDataset(torch.utils.data.Dataset[tuple[Any, int, int]]):
    """Items ``(transform(image), label, index)``, ``index`` being the item's position here."""

    def __init__(
        self,
        read: Callable[[int], Image.Image],
        positions: np.ndarray,
        labels: torch.Tensor,
        transform: Transform,
    ) -> None:
        self.read = read
        self.positions = positions
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image = self.read(int(self.positions[index]))
        return self.transform(image), int(self.labels[index]), index


@dataclasses.dataclass(frozen=True)
class _Source:
    """One split as its loader found it, before subsampling and transforms."""

    read: Callable[[int], Image.Image]  # position -> RGB image
    labels: np.ndarray  # int64
    groups: np.ndarray | None  # int64
    path: Callable[[int], Path] | None = None  # position -> image file, for file-backed sources
    wilds: Any = None  # the WILDS dataset whose eval() scores this split
    metadata: torch.Tensor | None = None  # the split's rows of WILDS' metadata_array
    class_map: torch.Tensor | None = None  # becomes Split.class_map


@dataclasses.dataclass(frozen=True)
class _Loaded:
    sources: dict[str, _Source]
    classnames: list[str]
    where: str  # for messages: the folder or file the data came from; "" when built in


# --- the public entry points ---------------------------------------------------------------


def load_data(
    cfg: DatasetConfig, train_transform: Transform, eval_transform: Transform, source: str
) -> Data:
    """Load every split of ``cfg``'s data set.

    ``train`` items go through ``train_transform``, all other splits through ``eval_transform``.
    """
    templates = prompts.templates_for(cfg.templates, cfg.name, source)
    loaded = _load(cfg, source)
    splits = {}
    for name, src in loaded.sources.items():
        transform = train_transform if name == "train" else eval_transform
        splits[name] = _make_split(name, src, transform, cfg.subsample)
    if cfg.cache != "none":
        plan = cache.plan(train_transform, eval_transform, source)
        splits = {name: _cached(split, loaded.sources[name], plan, cfg)
                  for name, split in splits.items()}
    return Data(classnames=loaded.classnames, templates=templates, splits=splits)


def _cached(split: Split, src: _Source, plan: cache.Plan, cfg: DatasetConfig) -> Split:
    """``split`` with its items decoded once into uint8 pixels, augmented on the device."""
    base = split.dataset
    assert isinstance(base, ImageDataset)  # _make_split builds one
    stored = ImageDataset(base.read, base.positions, base.labels, plan.store)
    if cfg.cache == "memory":
        store = cache.memory_store(len(stored), plan.size)
    else:
        # Everything that decides the pixels: a change in any of them is a new folder.
        key = cache.cache_key({"name": cfg.name, "root": cfg.root, "metadata": cfg.metadata,
                               "split": split.name, "transform": repr(plan.store),
                               "positions": _digest(base.positions),
                               "first": str(src.path(0)) if src.path and len(base) else ""})
        folder = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache.default_dir()
        store = cache.disk_store(folder, key, len(stored), plan.size)
    return dataclasses.replace(split, dataset=cache.CachedImages(stored, store),
                               prepare=plan.prepare(train=split.name == "train"))


def _digest(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()[:20]


def check_data(cfg: DatasetConfig, source: str) -> str:
    """Check the data set's root, layout and metadata, reading no images; describe it in a line.

    Also checks that the first image file of each split exists. Raises :class:`DataError`
    naming the expected path when something is missing.
    """
    prompts.templates_for(cfg.templates, cfg.name, source)
    if cfg.name in _WILDS and cfg.download:
        folder, missing = _wilds_layout(cfg, source)
        if missing:
            return f"{cfg.name} at {folder}: not there yet, to be downloaded (dataset.download)"
    loaded = _load(cfg, source)
    for name, src in loaded.sources.items():
        if src.path is not None and len(src.labels) and not src.path(0).exists():
            raise DataError(f"{source}: dataset.root: first {name} image not found: {src.path(0)}")
    sizes = ", ".join(f"{name} {len(src.labels)}" for name, src in loaded.sources.items())
    where = f"at {loaded.where}" if loaded.where else "(built in)"
    classes = len(loaded.classnames)
    return f"{cfg.name} {where}: {len(loaded.sources)} splits ({sizes}), {classes} classes"


def _load(cfg: DatasetConfig, source: str) -> _Loaded:
    if cfg.name in _WILDS:
        return _load_wilds(cfg, source)
    if cfg.name == "csv":
        return _load_csv(cfg, source)
    if cfg.name == "synthetic":
        return _load_synthetic(cfg, source)
    if cfg.name == "imagenet":
        from flyp_ray import imagenet  # here: imagenet builds on this module's _Source and _Loaded

        return imagenet.load(cfg, source)
    from flyp_ray import transfer  # here: transfer builds on this module's _Source and _Loaded

    if cfg.name in transfer.NAMES:
        return transfer.load(cfg, source)
    raise ConfigError(source, "dataset.name", f"unknown data set {cfg.name!r}")


def _make_split(name: str, src: _Source, transform: Transform, subsample: int | None) -> Split:
    kept = subsample_positions(len(src.labels), subsample)
    labels = torch.as_tensor(src.labels[kept], dtype=torch.int64)
    groups = None if src.groups is None else torch.as_tensor(src.groups[kept], dtype=torch.int64)
    official = None
    if src.wilds is not None and src.metadata is not None:
        official = _WildsEval(src.wilds, src.metadata[torch.as_tensor(kept)])
    return Split(name=name, dataset=ImageDataset(src.read, kept, labels, transform), labels=labels,
                 groups=groups, official_eval=official, class_map=src.class_map)


def subsample_positions(n: int, limit: int | None) -> np.ndarray:
    """At most ``limit`` of ``range(n)``: a sorted random subset, the same on every call."""
    if limit is None or n <= limit:
        return np.arange(n)
    rng = np.random.default_rng(SUBSAMPLE_SEED)
    return np.sort(rng.choice(n, size=limit, replace=False))


# --- images --------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _open_rgb(open_image: Callable[[], Image.Image], path: Path) -> Image.Image:
    """Open and decode an image now, so that a broken file fails here with its name."""
    try:
        image = open_image()
        image.load()  # PIL opens lazily; decode errors would otherwise surface in a transform
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path} ({_one_line(err)})") from err


class _FileReader:
    """Reads the images of a file list (a csv data set)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __call__(self, position: int) -> Image.Image:
        path = self.paths[position]
        return _open_rgb(lambda: Image.open(path), path)

    def path(self, position: int) -> Path:
        return self.paths[position]


# --- WILDS ---------------------------------------------------------------------------------


def _iwildcam_path(dataset: Any, index: int) -> Path:
    return Path(dataset.data_dir) / "train" / str(dataset._input_array[index])


def _fmow_path(dataset: Any, index: int) -> Path:
    return Path(dataset.root) / "images" / f"rgb_img_{dataset.full_idxs[index]}.png"


def _camelyon17_path(dataset: Any, index: int) -> Path:
    return Path(dataset.data_dir) / str(dataset._input_array[index])


@dataclasses.dataclass(frozen=True)
class _WildsSpec:
    module: str  # where WILDS defines the data set class
    cls: str
    files: tuple[str, ...]  # besides RELEASE_v<version>.txt, what its constructor reads
    group_field: str  # the metadata field that is our group
    image_path: Callable[[Any, int], Path]  # mirrors the class's get_input, for messages


_WILDS: dict[str, _WildsSpec] = {
    "iwildcam": _WildsSpec(
        "wilds.datasets.iwildcam_dataset", "IWildCamDataset", ("metadata.csv",),
        "location", _iwildcam_path,
    ),
    "fmow": _WildsSpec(
        "wilds.datasets.fmow_dataset", "FMoWDataset",
        ("rgb_metadata.csv", "country_code_mapping.csv"), "region", _fmow_path,
    ),
    "camelyon17": _WildsSpec(
        "wilds.datasets.camelyon17_dataset", "Camelyon17Dataset", ("metadata.csv",),
        "hospital", _camelyon17_path,
    ),
}
# WILDS split name for each of ours; WILDS' val and test are the out-of-distribution ones.
WILDS_SPLITS: dict[str, str] = {"train": "train", "id_val": "id_val", "id_test": "id_test",
                                "ood_val": "val", "ood_test": "test"}


def wilds_folder(name: str, root: str | Path) -> Path:
    """Where WILDS looks for data set ``name``: ``<root>/<name>_v<latest version>``."""
    return Path(root).expanduser() / f"{name}_v{_wilds_version(name)}"


def _wilds_version(name: str) -> str:
    spec = _WILDS[name]
    versions = getattr(importlib.import_module(spec.module), spec.cls)._versions_dict
    # WILDS loads its latest version when none is given; follow it rather than hard-code one.
    return max(versions, key=lambda v: tuple(int(p) for p in v.split(".")))


def _root(cfg: DatasetConfig, source: str) -> Path:
    if cfg.root is None:
        raise ConfigError(source, "dataset.root", f"is required for dataset {cfg.name}, got None")
    return Path(cfg.root).expanduser()


def _wilds_layout(cfg: DatasetConfig, source: str) -> tuple[Path, list[Path]]:
    """The folder WILDS will read and which of its required files are missing."""
    folder = wilds_folder(cfg.name, _root(cfg, source))
    required = [folder / f"RELEASE_v{_wilds_version(cfg.name)}.txt"]
    required += [folder / f for f in _WILDS[cfg.name].files]
    return folder, [p for p in required if not p.is_file()]


def _check_wilds_layout(cfg: DatasetConfig, source: str) -> Path:
    folder, missing = _wilds_layout(cfg, source)
    if cfg.download or not missing:
        return folder
    files = ", ".join(p.name for p in missing)
    what = f"folder {folder}" if not folder.is_dir() else f"{files} in {folder}"
    raise DataError(
        f"{source}: dataset.root: {cfg.name} not found: expected {what} (root {cfg.root}; "
        "get it from https://wilds.stanford.edu or set dataset.download: true)"
    )


def _avg_over_groups(
    v: torch.Tensor, g: torch.Tensor, n_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """WILDS' ``avg_over_groups`` in plain torch: the mean of ``v`` per group, 0 if empty."""
    counts = torch.zeros(n_groups, device=g.device)
    unique, unique_counts = torch.unique(g, return_counts=True)
    counts[unique] = unique_counts.float()
    means = torch.zeros(n_groups, dtype=v.dtype, device=v.device)
    return means.scatter_reduce(0, g, v, reduce="mean", include_self=False), counts


def _patch_wilds_group_metrics() -> None:
    """Let WILDS' group metrics run without torch_scatter.

    WILDS imports the compiled ``torch_scatter`` extension only to average metrics per group
    (FMoW's worst-region and Camelyon17's per-slide accuracy); it is often not built for the
    installed torch. ``torch.scatter_reduce`` computes the same means, so it stands in when the
    extension is absent, and WILDS' own metric code stays in charge of everything else.
    """
    if importlib.util.find_spec("torch_scatter") is not None:
        return
    import wilds.common.metrics.metric as metric
    import wilds.common.utils as utils

    utils.avg_over_groups = _avg_over_groups
    metric.avg_over_groups = _avg_over_groups  # metric.py imported the name: rebind it there too


def _open_wilds(cfg: DatasetConfig, folder: Path, source: str) -> Any:
    import wilds  # here, not at the top: only WILDS data sets pay for importing it

    _patch_wilds_group_metrics()
    try:
        # WILDS reports progress with print(); stdout is reserved for the final JSON line.
        with contextlib.redirect_stdout(sys.stderr):
            root = str(_root(cfg, source))
            return wilds.get_dataset(cfg.name, root_dir=root, download=cfg.download)
    except (AssertionError, KeyError, IndexError, ValueError, TypeError, OSError) as err:
        problem = f"cannot load {cfg.name} from {folder} ({_one_line(err)})"
        raise DataError(f"{source}: dataset.root: {problem}") from err


def _load_wilds(cfg: DatasetConfig, source: str) -> _Loaded:
    spec = _WILDS[cfg.name]
    folder = _check_wilds_layout(cfg, source)
    dataset = _open_wilds(cfg, folder, source)
    field = list(dataset.metadata_fields).index(spec.group_field)
    sources = {}
    for ours in SPLITS:
        theirs = WILDS_SPLITS[ours]
        if theirs not in dataset.split_dict:
            continue
        subset = dataset.get_subset(theirs)
        if len(subset) == 0:  # e.g. an FMoW folder without images of the OOD years
            continue
        sources[ours] = _wilds_source(dataset, subset, field, spec)
    classnames = prompts.classnames_for(cfg.name, cfg.classnames, int(dataset.n_classes), source)
    return _Loaded(sources=sources, classnames=classnames, where=str(folder))


def _wilds_source(dataset: Any, subset: Any, group_field: int, spec: _WildsSpec) -> _Source:
    metadata = subset.metadata_array
    reader = _WildsReader(dataset, np.asarray(subset.indices), spec.image_path)
    return _Source(
        read=reader,
        labels=np.asarray(subset.y_array, dtype=np.int64),
        groups=metadata[:, group_field].numpy().astype(np.int64),
        path=reader.path,
        wilds=dataset,
        metadata=metadata,
    )


class _WildsReader:
    """Reads a WILDS split's images through the data set's own ``get_input``."""

    def __init__(
        self, dataset: Any, indices: np.ndarray, image_path: Callable[[Any, int], Path]
    ) -> None:
        self.dataset = dataset
        self.indices = indices
        self.image_path = image_path

    def __call__(self, position: int) -> Image.Image:
        index = int(self.indices[position])
        return _open_rgb(lambda: self.dataset.get_input(index), self.path(position))

    def path(self, position: int) -> Path:
        return self.image_path(self.dataset, int(self.indices[position]))


class _WildsEval:
    """WILDS' official metrics for items of one split, given by their indices in that split."""

    def __init__(self, dataset: Any, metadata: torch.Tensor) -> None:
        self.dataset = dataset
        self.metadata = metadata

    def __call__(
        self, y_pred: torch.Tensor, y_true: torch.Tensor, indices: torch.Tensor
    ) -> dict[str, float]:
        metadata = self.metadata[indices.detach().cpu().long()]
        results, _ = self.dataset.eval(y_pred.detach().cpu(), y_true.detach().cpu(), metadata)
        return {str(k): float(v) for k, v in results.items()}


# --- csv -----------------------------------------------------------------------------------

_CSV_COLUMNS = ("filepath", "label", "split")


def _load_csv(cfg: DatasetConfig, source: str) -> _Loaded:
    root = _root(cfg, source)
    if not root.is_dir():
        raise DataError(f"{source}: dataset.root: folder not found: {root}")
    classnames = prompts.classnames_for("csv", cfg.classnames, None, source)
    path = root / cfg.metadata
    table = _read_table(path, source)
    labels = _csv_ints(table, "label", path)
    bad = np.flatnonzero((labels < 0) | (labels >= len(classnames)))
    if len(bad):
        row = int(bad[0])
        raise DataError(f"{path}: line {row + 2}: label must be in 0..{len(classnames) - 1} "
                        f"({len(classnames)} class names), got {labels[row]}")
    splits = _csv_splits(table, path)
    groups = _csv_groups(table, path) if "group" in table.columns else None
    files = [root / p for p in table["filepath"]]
    sources = {}
    for name in SPLITS:
        rows = np.flatnonzero(splits == name)
        if len(rows):
            reader = _FileReader([files[i] for i in rows])
            group = None if groups is None else groups[rows]
            sources[name] = _Source(reader, labels[rows], group, path=reader.path)
    return _Loaded(sources=sources, classnames=classnames, where=str(path))


def _read_table(path: Path, source: str) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{source}: dataset.metadata: file not found: {path}")
    try:
        # All strings: numbers are parsed below, where a bad one can be named with its line.
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (ValueError, OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV file ({_one_line(err)})") from err
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in _CSV_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(
            f"{path}: missing column {missing[0]!r} "
            f"(needs filepath, label, split[, group]; has {', '.join(table.columns)})"
        )
    for column in table.columns:
        table[column] = table[column].str.strip()
    empty = np.flatnonzero((table[list(_CSV_COLUMNS)] == "").any(axis=1).to_numpy())
    if len(empty):
        line = int(empty[0]) + 2
        raise DataError(f"{path}: line {line}: empty value in {', '.join(_CSV_COLUMNS)}")
    return table


def _csv_ints(table: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    values = table[column]
    parsed = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    bad = np.flatnonzero(~np.isfinite(parsed) | (parsed % 1 != 0))
    if len(bad):
        row = int(bad[0])
        value = values.iloc[row]
        raise DataError(f"{path}: line {row + 2}: {column} must be an integer, got {value!r}")
    return parsed.astype(np.int64)


def _csv_splits(table: pd.DataFrame, path: Path) -> np.ndarray:
    splits = table["split"].to_numpy(dtype=str)
    bad = np.flatnonzero(~np.isin(splits, SPLITS))
    if len(bad):
        row = int(bad[0])
        allowed = ", ".join(SPLITS)
        got = splits[row]
        raise DataError(f"{path}: line {row + 2}: split must be one of {allowed}, got {got!r}")
    return splits


def _csv_groups(table: pd.DataFrame, path: Path) -> np.ndarray:
    """Integer groups as given; named groups numbered in sorted order of their names."""
    values = table["group"].to_numpy(dtype=str)
    if (values == "").any():
        raise DataError(f"{path}: line {int(np.flatnonzero(values == '')[0]) + 2}: empty group")
    numeric = pd.to_numeric(table["group"], errors="coerce").to_numpy(dtype=float)
    if np.isfinite(numeric).all() and (numeric % 1 == 0).all() and (numeric >= 0).all():
        return numeric.astype(np.int64)
    _, codes = np.unique(values, return_inverse=True)
    return codes.astype(np.int64)


# --- synthetic -----------------------------------------------------------------------------


def _load_synthetic(cfg: DatasetConfig, source: str) -> _Loaded:
    count = len(synthetic.CLASSNAMES)
    classnames = prompts.classnames_for("synthetic", cfg.classnames, count, source)
    sources = {}
    for name in SPLITS:
        split = synthetic.ShapesSplit(name)
        sources[name] = _Source(read=split.image, labels=split.labels(), groups=split.groups())
    return _Loaded(sources=sources, classnames=classnames, where="")
