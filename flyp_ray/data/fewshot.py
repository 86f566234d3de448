"""Few-shot training sets: K images per class, drawn with a seed, for any number of classes.

A draw is a function of (labels, K, seed) only, so every worker of a run, and a resumed run,
trains on the same images. ``train.repeats`` draws again with seeds ``seed, seed + 1, ...``,
each draw a Train run of its own (:mod:`flyp_ray.distributed.draws`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils.data import Dataset

from flyp_ray.data.base import Data
from flyp_ray.errors import DataError


class Drawn(Dataset[tuple[Any, int, int]]):
    """Items ``indices`` of ``dataset``, numbered by their position here, as every split's are."""

    def __init__(self, dataset: Dataset[tuple[Any, int, int]], indices: list[int]) -> None:
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image, label, _ = self.dataset[self.indices[index]]
        return image, label, index


def draw(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Sorted positions of ``k`` items of every class present in ``labels``."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        if len(members) < k:
            raise DataError(f"train.k_shot: {k} images per class asked, but class {label} has "
                            f"{len(members)} training images")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.sort(torch.cat(chosen)).values


def few_shot(data: Data, k: int | None, seed: int) -> Data:
    """``data`` with its training split cut to ``k`` images per class (``k`` None: unchanged)."""
    if k is None:
        return data
    split = data.splits["train"]
    kept = draw(split.labels, k, seed)
    groups = None if split.groups is None else split.groups[kept]
    train = dataclasses.replace(split, dataset=Drawn(split.dataset, kept.tolist()),
                                labels=split.labels[kept], groups=groups, official_eval=None)
    return dataclasses.replace(data, splits={**data.splits, "train": train})
