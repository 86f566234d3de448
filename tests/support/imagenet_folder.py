"""Miniatures of ImageNet and its shift sets, in their real folder layouts and file names.

A few real classes, a few tiny images per class: enough for :mod:`flyp_ray.data.imagenet` to load
them exactly as it loads the full sets. Used by tests/data/test_imagenet.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

# (wnid, standard class index); the shift sets below use real members of their class lists.
IMAGENET = (("n01440764", 0), ("n01443537", 1), ("n01484850", 2))  # tench, goldfish, shark
IMAGENET_R = (("n01443537", 1), ("n01484850", 2))  # ImageNet-R classes 0 and 1
IMAGENET_A = (("n01498041", 6), ("n01531178", 11))  # stingray, goldfinch: ImageNet-A 0 and 1
# ObjectNet folder -> (its ObjectNet name, its ImageNet names, their standard indices and
# lines in the devkit's label list), as in the release's mappings/.
OBJECTNET = {
    "alarm_clock": ("Alarm clock", "analog clock; digital clock", {409: 426, 530: 427}),
    "banana": ("Banana", "banana", {954: 230}),
    "lemon": ("Lemon", "lemon", {951: 227}),
}
OBJECTNET_ONLY = ("squeegee", "Squeegee")  # an ObjectNet class with no ImageNet counterpart
DEVKIT_LINES = {426: "analog clock", 427: "digital clock", 230: "banana", 227: "lemon"}

TRAIN_PER_CLASS = 5
PER_CLASS = 2  # val and every shift set


def image(path: Path, shade: int, size: tuple[int, int] = (12, 10)) -> None:
    """A tiny single-colour image; the format follows the file's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".png": "PNG"}.get(path.suffix.lower(), "JPEG")
    Image.new("RGB", size, (shade, 255 - shade, 128)).save(path, fmt)


def write_imagenet(root: Path) -> Path:
    """ILSVRC-2012 as class folders: ``train/<wnid>/<wnid>_<n>.JPEG``, ``val/<wnid>/ILSVRC...``.

    Returns the ImageNet folder (``dataset.root``); the shift sets go next to it.
    """
    folder = root / "imagenet"
    val_id = 293
    for wnid, label in IMAGENET:
        for n in range(TRAIN_PER_CLASS):
            image(folder / "train" / wnid / f"{wnid}_{10026 + n}.JPEG", 40 * label + n)
        for _ in range(PER_CLASS):
            image(folder / "val" / wnid / f"ILSVRC2012_val_{val_id:08d}.JPEG", 40 * label)
            val_id += 1
    return folder


def write_shift_sets(root: Path) -> None:
    """ImageNetV2, -R, -A, -Sketch and ObjectNet under ``root``, as their releases unpack."""
    v2 = root / "imagenetv2-matched-frequency-format-val"
    for _, label in IMAGENET:
        for n in range(PER_CLASS):
            image(v2 / str(label) / f"{label:04d}{n}f2c1b0a9e8d7c6b5a4.jpeg", label)
    for wnid, _ in IMAGENET_R:
        for n in range(PER_CLASS):
            image(root / "imagenet-r" / wnid / f"art_{n}.jpg", n)
    for wnid, _ in IMAGENET_A:
        for n in range(PER_CLASS):
            image(root / "imagenet-a" / wnid / f"0.00{n}116_digital clock _ stingray_0.8.jpg", n)
    for wnid, _ in IMAGENET:
        for n in range(PER_CLASS):
            image(root / "sketch" / wnid / f"sketch_{n}.JPEG", n)
    write_objectnet(root / "objectnet-1.0")


def write_objectnet(folder: Path) -> None:
    """``images/<folder>/*.png`` (with a border to crop) and the four ``mappings/`` files."""
    for name in [*OBJECTNET, OBJECTNET_ONLY[0]]:
        for n in range(PER_CLASS):
            image(folder / "images" / name / f"{n}a1b2c3d4e5f6.png", 30 * n, size=(20, 16))
    mappings = folder / "mappings"
    mappings.mkdir(parents=True)
    to_label = {f: name for f, (name, _, _) in OBJECTNET.items()}
    to_label[OBJECTNET_ONLY[0]] = OBJECTNET_ONLY[1]
    (mappings / "folder_to_objectnet_label.json").write_text(json.dumps(to_label))
    to_imagenet = {name: imagenet for name, imagenet, _ in OBJECTNET.values()}
    (mappings / "objectnet_to_imagenet_1k.json").write_text(json.dumps(to_imagenet))
    lines = {str(i): line for _, _, ids in OBJECTNET.values() for i, line in ids.items()}
    (mappings / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps(lines))
    devkit = [DEVKIT_LINES.get(i, f"class {i}") for i in range(1000)]
    (mappings / "imagenet_to_label_2012_v2").write_text("\n".join(devkit) + "\n")
