"""WILDS data sets (iWildCam, FMoW, Camelyon17) through WILDS' own loader on the user's folder.

``wilds.get_dataset(..., download=False)`` reads the folder, never a download unless
``dataset.download`` is true. WILDS' ``val``/``test`` are the out-of-distribution splits and
become ``ood_val``/``ood_test``; each split's ``official_eval`` runs WILDS' ``dataset.eval`` so
that reported numbers match the benchmark's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from flyp_ray.config import SPLITS, DatasetConfig
from flyp_ray.data import prompts
from flyp_ray.data.base import (
    Loaded,
    Source,
    dataset_root,
    files_fingerprint,
    one_line,
    open_rgb,
)
from flyp_ray.errors import DataError


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


SPECS: dict[str, _WildsSpec] = {
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
    spec = SPECS[name]
    versions = getattr(importlib.import_module(spec.module), spec.cls)._versions_dict
    # WILDS loads its latest version when none is given; follow it rather than hard-code one.
    return max(versions, key=lambda v: tuple(int(p) for p in v.split(".")))


def layout(cfg: DatasetConfig, source: str) -> tuple[Path, list[Path]]:
    """The folder WILDS will read and which of its required files are missing."""
    folder = wilds_folder(cfg.name, dataset_root(cfg, source))
    required = [folder / f"RELEASE_v{_wilds_version(cfg.name)}.txt"]
    required += [folder / f for f in SPECS[cfg.name].files]
    return folder, [p for p in required if not p.is_file()]


def check_layout(cfg: DatasetConfig, source: str) -> Path:
    folder, missing = layout(cfg, source)
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
            root = str(dataset_root(cfg, source))
            return wilds.get_dataset(cfg.name, root_dir=root, download=cfg.download)
    except (AssertionError, KeyError, IndexError, ValueError, TypeError, OSError) as err:
        problem = f"cannot load {cfg.name} from {folder} ({one_line(err)})"
        raise DataError(f"{source}: dataset.root: {problem}") from err


def load(cfg: DatasetConfig, source: str) -> Loaded:
    spec = SPECS[cfg.name]
    folder = check_layout(cfg, source)
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
        sources[ours] = _wilds_source(dataset, subset, field, spec, folder)
    classnames = prompts.classnames_for(cfg.name, cfg.classnames, int(dataset.n_classes), source)
    return Loaded(sources=sources, classnames=classnames, where=str(folder))


def _wilds_source(dataset: Any, subset: Any, group_field: int, spec: _WildsSpec,
                  folder: Path) -> Source:
    metadata = subset.metadata_array
    reader = _WildsReader(dataset, np.asarray(subset.indices), spec.image_path)
    return Source(
        read=reader,
        labels=np.asarray(subset.y_array, dtype=np.int64),
        groups=metadata[:, group_field].numpy().astype(np.int64),
        path=reader.path,
        official=functools.partial(_official_eval, dataset, metadata),
        # The metadata tables hold more than labels and groups (what WILDS' official metrics
        # read: sequences, dates, ...): their stats stand for them in the data digest.
        fingerprint=files_fingerprint([folder / name for name in spec.files]),
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
        return open_rgb(lambda: self.dataset.get_input(index), self.path(position))

    def path(self, position: int) -> Path:
        return self.image_path(self.dataset, int(self.indices[position]))


def _official_eval(dataset: Any, metadata: torch.Tensor, kept: np.ndarray) -> _WildsEval:
    """WILDS' metrics of the ``kept`` items of a split whose metadata rows are ``metadata``."""
    return _WildsEval(dataset, metadata[torch.as_tensor(kept)])


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
