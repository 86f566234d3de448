"""``csv`` data sets: ``<root>/<metadata>`` with columns ``filepath,label,split[,group]`` and a
class-name file: any image set, with any of the five splits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from flyp_ray.config import SPLITS, DatasetConfig
from flyp_ray.data import prompts
from flyp_ray.data.base import FileReader, Loaded, Source, dataset_root, one_line
from flyp_ray.errors import DataError

_CSV_COLUMNS = ("filepath", "label", "split")


def load(cfg: DatasetConfig, source: str) -> Loaded:
    """Every split the metadata file names, with the configured class names."""
    root = dataset_root(cfg, source)
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
            reader = FileReader([files[i] for i in rows])
            group = None if groups is None else groups[rows]
            sources[name] = Source(reader, labels[rows], group, path=reader.path)
    return Loaded(sources=sources, classnames=classnames, where=str(path))


def _read_table(path: Path, source: str) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{source}: dataset.metadata: file not found: {path}")
    try:
        # All strings: numbers are parsed below, where a bad one can be named with its line.
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (ValueError, OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV file ({one_line(err)})") from err
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
