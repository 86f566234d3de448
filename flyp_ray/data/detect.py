"""What kind of data set a folder (or a hub name) holds, for ``flyp-ray init``.

Looked for in this order, each by the files its loader reads first:

| kind | recognised by |
| --- | --- |
| ``huggingface`` | ``dataset_dict.json`` (``save_to_disk``); or not a path but a hub name |
| WILDS (``iwildcam``, ``fmow``, ``camelyon17``) | ``<name>_v<version>/`` in it, or it is one |
| ``csv`` | ``metadata.csv``, with ``classnames.txt`` beside it |
| ``imagefolder`` | a split folder (``train``, ``val``, ``test``, ...) |

Then the kind's own loader reads the folder as a run would (:func:`flyp_ray.data.load.
inspect_data`), so whatever ``init`` reports is what ``validate`` and the runs will see.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from flyp_ray.data import huggingface
from flyp_ray.data.base import OWN_SPLITS, OWN_SPLITS_TEXT, DataFacts
from flyp_ray.errors import DataError

WILDS_KINDS = ("iwildcam", "fmow", "camelyon17")
CLASSNAMES_FILE = "classnames.txt"


@dataclasses.dataclass(frozen=True)
class Found:
    """A data set as ``init`` found it."""

    dataset: dict[str, Any]  # the config's dataset section: name, root, what the kind needs
    facts: DataFacts  # what its loader read: splits, sizes, classes
    name: str  # what people call it: the folder's or hub name, or the WILDS set's


def detect(data: str, source: str = "init") -> Found:
    """The kind, config section and facts of the data set at ``data``; a DataError saying what
    was looked for when it is none of the kinds."""
    from flyp_ray.config import DatasetConfig
    from flyp_ray.data.load import inspect_data

    dataset, name = _section(data)
    cfg = DatasetConfig(**dataset)
    if cfg.name == "huggingface":
        image, label = huggingface.columns(cfg, source)
        dataset = {**dataset, "image_column": image, "label_column": label}
    return Found(dataset=dataset, facts=inspect_data(cfg, source), name=name)


def _section(data: str) -> tuple[dict[str, Any], str]:
    path = Path(data).expanduser()
    if not path.exists():
        if huggingface.HUB_NAME.match(data) and not data.startswith((".", "~", "/")):
            return {"name": "huggingface", "root": data}, data
        raise DataError(f"{data}: no such folder (nor a Hugging Face hub name)")
    if not path.is_dir():
        raise DataError(f"{data}: not a folder (give the data set's folder)")
    root = path.resolve()
    if huggingface.is_saved(root):
        return {"name": "huggingface", "root": str(root)}, root.name
    children = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    wilds = _wilds(root, children)  # before csv: a WILDS folder holds a metadata.csv too
    if wilds is not None:
        return wilds
    if (root / "metadata.csv").is_file():
        return _csv(root), root.name
    if any(name in OWN_SPLITS for name in children):
        return {"name": "imagefolder", "root": str(root)}, root.name
    raise DataError(f"{root}: found no data set: not a save_to_disk folder (dataset_dict.json), "
                    f"a csv root (metadata.csv), an ImageFolder (split folders "
                    f"{OWN_SPLITS_TEXT}) or a WILDS root" + _hint(children))


def _csv(root: Path) -> dict[str, Any]:
    classnames = root / CLASSNAMES_FILE
    if not classnames.is_file():
        raise DataError(f"{root}: a csv data set (metadata.csv) needs its class names in "
                        f"{classnames}, one a line, label 0 first")
    return {"name": "csv", "root": str(root), "classnames": str(classnames)}


def _wilds(root: Path, children: list[str]) -> tuple[dict[str, Any], str] | None:
    """A WILDS root (holding ``<kind>_v<version>/``), or a WILDS data set's own folder."""
    for kind in WILDS_KINDS:
        pattern = re.compile(rf"^{kind}_v[\d.]+$")
        if any(pattern.match(name) for name in children):
            return {"name": kind, "root": str(root)}, kind
        if pattern.match(root.name):
            return {"name": kind, "root": str(root.parent)}, kind
    return None


def _hint(children: list[str]) -> str:
    if children:
        shown = ", ".join(sorted(children)[:3])
        return (f"; its folders ({shown}{', ...' if len(children) > 3 else ''}) look like "
                f"class folders: put them under train/ (and val/, test/) for an ImageFolder")
    return ""
