"""Write small data-set folders that the real loaders read: WILDS layouts and the csv layout.

Images carry the class in their colour (and a shape whose size depends on the class), on a
background whose tint depends on the domain, so a model can learn the class and a shift exists.
Every WILDS writer follows what the installed WILDS class reads; see its ``__init__``.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

# WILDS split names in the order the folders list them; val and test are the OOD ones.
WILDS_SPLIT_NAMES = ("train", "val", "test", "id_val", "id_test")
CSV_SPLITS = ("train", "id_val", "id_test", "ood_val", "ood_test")


def class_image(
    label: int, num_classes: int, domain: int, size: int, rng: np.random.Generator
) -> Image.Image:
    """A square of the class's hue, sized by class, on a domain-tinted noisy background."""
    background = np.array([200, 200, 200]) if domain % 2 == 0 else np.array([70, 60, 90])
    pixels = background + rng.normal(0, 12, (size, size, 3))
    hue = label / max(num_classes, 1)
    colour = np.array(colorsys.hsv_to_rgb(hue, 0.9, 0.95)) * 255
    half = size // 4 + (label % 3)
    lo, hi = size // 2 - half, size // 2 + half
    pixels[lo:hi, lo:hi] = colour
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _labels(n: int, num_classes: int) -> list[int]:
    # Cycling through the classes puts every class in every split, as WILDS' iWildCam loader
    # demands that every label up to max(y) occurs somewhere.
    return [i % num_classes for i in range(n)]


def write_iwildcam(root: Path, n_per_split: int = 8, num_classes: int = 4, image_size: int = 32,
                   seed: int = 0) -> Path:
    """Write ``<root>/iwildcam_v2.0/``: metadata.csv, categories.csv, RELEASE_v2.0.txt, train/*.jpg.

    The ID splits share locations 0-2; ``val`` has locations 3-4 and ``test`` 5-6 (unseen camera
    traps, as in WILDS). Returns the data set folder.
    """
    folder = Path(root) / "iwildcam_v2.0"
    (folder / "train").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    locations = {"train": (0, 1, 2), "id_val": (0, 1, 2), "id_test": (0, 1, 2),
                 "val": (3, 4), "test": (5, 6)}
    rows = []
    for split in WILDS_SPLIT_NAMES:
        for i, y in enumerate(_labels(n_per_split, num_classes)):
            location = locations[split][i % len(locations[split])]
            filename = f"{split}_{i:04d}.jpg"
            image = class_image(y, num_classes, location, image_size, rng)
            image.save(folder / "train" / filename, quality=95)
            rows.append({
                "split": split, "location_remapped": location, "location": 100 + location,
                "sequence_remapped": len(rows), "sequence": f"seq{len(rows):05d}",
                "datetime": f"2013-06-{1 + i % 28:02d} {i % 24:02d}:{i % 60:02d}:00.000",
                "filename": filename, "image_id": f"img{len(rows):05d}",
                "y": y, "category_id": 1000 + y,
            })
    pd.DataFrame(rows).to_csv(folder / "metadata.csv", index=False)
    categories = pd.DataFrame({"y": range(num_classes),
                               "category_id": [1000 + y for y in range(num_classes)],
                               "name": [f"species {y}" for y in range(num_classes)]})
    categories.to_csv(folder / "categories.csv", index=False)
    (folder / "RELEASE_v2.0.txt").write_text("v2.0 (test copy)\n")
    return folder


def write_camelyon17(root: Path, n_per_split: int = 8, image_size: int = 32, seed: int = 0) -> Path:
    """Write ``<root>/camelyon17_v1.0/``: hospitals 0 (train/id_val), 1 (val) and 2 (test)."""
    folder = Path(root) / "camelyon17_v1.0"
    rng = np.random.default_rng(seed)
    # (split, center, split id): WILDS overrides the split column of centers 1 and 2.
    parts = (("train", 0, 0), ("id_val", 0, 1), ("val", 1, 0), ("test", 2, 0))
    rows = []
    for _split, center, split_id in parts:
        patient = f"{center:03d}"
        patch_dir = folder / "patches" / f"patient_{patient}_node_0"
        patch_dir.mkdir(parents=True, exist_ok=True)
        for i, tumor in enumerate(_labels(n_per_split, 2)):
            x, y = 100 + i, 200 + len(rows)
            class_image(tumor, 2, center, image_size, rng).save(
                patch_dir / f"patch_patient_{patient}_node_0_x_{x}_y_{y}.png")
            rows.append({"patient": patient, "node": 0, "x_coord": x, "y_coord": y, "tumor": tumor,
                         "slide": center, "center": center, "split": split_id})
    pd.DataFrame(rows).to_csv(folder / "metadata.csv")  # WILDS reads it with index_col=0
    (folder / "RELEASE_v1.0.txt").write_text("v1.0 (test copy)\n")
    return folder


def write_fmow(root: Path, n_per_split: int = 8, image_size: int = 32, seed: int = 0) -> Path:
    """Write ``<root>/fmow_v1.1/``: WILDS splits FMoW by year (OOD val 2013-15, OOD test 2016+)."""
    from wilds.datasets.fmow_dataset import categories

    folder = Path(root) / "fmow_v1.1"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # (their split column, year): the year decides ID versus OOD.
    parts = (("train", 2010), ("val", 2011), ("test", 2012), ("val", 2014), ("test", 2016))
    countries = ("USA", "FRA", "KEN", "IND", "AUS")
    rows = []
    for split, year in parts:
        for i, y in enumerate(_labels(n_per_split, 4)):
            country = countries[(i + year) % len(countries)]
            image = class_image(y, 4, year, image_size, rng)
            image.save(folder / "images" / f"rgb_img_{len(rows)}.png")
            rows.append({"split": split, "category": categories[y], "country_code": country,
                         "timestamp": f"{year}-05-{1 + i % 28:02d}T10:00:00Z"})
    pd.DataFrame(rows).to_csv(folder / "rgb_metadata.csv", index=False)
    regions = ("Americas", "Europe", "Africa", "Asia", "Oceania")
    mapping = pd.DataFrame({"alpha-3": countries, "region": regions})
    mapping.to_csv(folder / "country_code_mapping.csv", index=False)
    (folder / "RELEASE_v1.1.txt").write_text("v1.1 (test copy)\n")
    return folder


def write_csv_dataset(
    root: Path,
    n_per_split: int = 8,
    num_classes: int = 3,
    image_size: int = 32,
    splits: tuple[str, ...] = CSV_SPLITS,
    groups: bool = True,
    seed: int = 0,
) -> Path:
    """Write ``<root>/images/*.png``, ``<root>/metadata.csv`` and ``<root>/classnames.txt``.

    Groups (when written) are ``2 * is_ood + i % 2``. Returns ``root``.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for split in splits:
        domain = 1 if split.startswith("ood") else 0
        for i, y in enumerate(_labels(n_per_split, num_classes)):
            filepath = f"images/{split}_{i:04d}.png"
            class_image(y, num_classes, domain, image_size, rng).save(root / filepath)
            row = {"filepath": filepath, "label": y, "split": split}
            if groups:
                row["group"] = domain * 2 + i % 2
            rows.append(row)
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    (root / "classnames.txt").write_text("".join(f"thing {c}\n" for c in range(num_classes)))
    return root
