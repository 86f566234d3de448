"""A built-in image data set with a distribution shift, generated on the fly.

Each image is one coloured shape (the class) at a random place, size and angle. The in-distribution
splits (``train``, ``id_val``, ``id_test``) draw it on light, plain backgrounds; the
out-of-distribution splits (``ood_val``, ``ood_test``) on dark noisy or striped ones, so a model
that leans on the background loses accuracy there. The group of an image is its background style,
which gives ``worst_group_acc`` a meaning.

Every image is a pure function of ``(seed, split, index)``: nothing is stored, two processes draw
the same pixels, and one 64x64 image costs well under a millisecond. :func:`caption` describes the
same draw in words, for pre-training a tiny CLIP on image-caption pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

CLASSNAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "star")
SPLIT_SIZES: dict[str, int] = {
    "train": 1200, "id_val": 300, "id_test": 300, "ood_val": 300, "ood_test": 300,
}
# Background styles; the index is the group id. The first two are in-distribution.
BACKGROUNDS: tuple[str, ...] = ("plain white", "plain light grey", "dark noisy", "striped")
ID_BACKGROUNDS = (0, 1)
OOD_BACKGROUNDS = (2, 3)
# Saturated colours that stand out on light and on dark backgrounds alike.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (40, 175, 60),
    "blue": (40, 80, 230),
    "orange": (245, 140, 20),
    "purple": (150, 60, 200),
    "pink": (240, 90, 170),
    "teal": (20, 170, 170),
}
IMAGE_SIZE = 64
_SPLIT_CODES = {name: i for i, name in enumerate(SPLIT_SIZES)}


@dataclasses.dataclass(frozen=True)
class Draw:
    """Everything random about one image."""

    label: int
    background: int  # index into BACKGROUNDS, also the group id
    colour: str  # a key of COLOURS
    cx: float  # centre, as a fraction of the image side
    cy: float
    radius: float  # circumradius, as a fraction of the image side
    angle: float  # rotation in radians
    tone: float  # background brightness jitter in [0, 1]
    noise_seed: int  # seeds the background texture


def draw(split: str, index: int, seed: int = 0) -> Draw:
    """The random choices behind image ``index`` of ``split``."""
    rng = _rng(split, index, seed)
    backgrounds = OOD_BACKGROUNDS if split.startswith("ood") else ID_BACKGROUNDS
    radius = float(rng.uniform(0.16, 0.32))
    return Draw(
        label=int(rng.integers(len(CLASSNAMES))),
        background=int(backgrounds[rng.integers(len(backgrounds))]),
        colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
        cx=float(rng.uniform(radius, 1 - radius)),
        cy=float(rng.uniform(radius, 1 - radius)),
        radius=radius,
        angle=float(rng.uniform(0, 2 * np.pi)),
        tone=float(rng.uniform()),
        noise_seed=int(rng.integers(2**31)),
    )


def _rng(split: str, index: int, seed: int) -> np.random.Generator:
    if split not in _SPLIT_CODES:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(_SPLIT_CODES)})")
    return np.random.default_rng((seed, _SPLIT_CODES[split], index))


def image(split: str, index: int, seed: int = 0, size: int = IMAGE_SIZE) -> Image.Image:
    """Image ``index`` of ``split`` as an RGB PIL image of ``size`` x ``size`` pixels."""
    d = draw(split, index, seed)
    pixels = _background(d, size)
    mask = _shape_mask(CLASSNAMES[d.label], d, size)
    pixels[mask] = COLOURS[d.colour]
    return Image.fromarray(pixels)


def caption(split: str, index: int, seed: int = 0) -> str:
    """A plain-English caption of image ``index``: "a large red circle on a striped background"."""
    d = draw(split, index, seed)
    size_word = "small " if d.radius < 0.21 else "large " if d.radius > 0.27 else ""
    noun = f"{size_word}{d.colour} {CLASSNAMES[d.label]}"
    article = "an" if noun[0] in "aeiou" else "a"
    return f"{article} {noun} on a {BACKGROUNDS[d.background]} background"


# --- backgrounds ---------------------------------------------------------------------------


def _background(d: Draw, size: int) -> np.ndarray:
    style = BACKGROUNDS[d.background]
    if style == "plain white":
        return _flat(235 + 20 * d.tone, size)
    if style == "plain light grey":
        return _flat(190 + 30 * d.tone, size)
    rng = np.random.default_rng(d.noise_seed)
    if style == "dark noisy":
        base = 25 + 30 * d.tone
        noise = rng.normal(0.0, 18.0, (size, size, 1))
        return np.clip(base + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)
    return _stripes(d, rng, size)


def _flat(level: float, size: int) -> np.ndarray:
    return np.full((size, size, 3), int(level), dtype=np.uint8)


def _stripes(d: Draw, rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(0.08, 0.2)
    phase = np.cos(theta) * xx + np.sin(theta) * yy
    dark = (phase / period) % 1.0 < 0.5
    # Two mid-to-dark greys: textured, yet every colour in COLOURS stays visible on both.
    low, high = 40 + 30 * d.tone, 110 + 40 * d.tone
    level = np.where(dark, low, high).astype(np.uint8)
    return np.repeat(level[:, :, None], 3, axis=2)


# --- shapes --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1], cached: every image of a size shares them."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    return yy, xx


def _shape_mask(shape: str, d: Draw, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    dx, dy = xx - d.cx, yy - d.cy
    r = d.radius
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "ring":
        dist2 = dx * dx + dy * dy
        return (dist2 <= r * r) & (dist2 >= (0.6 * r) ** 2)
    if shape == "square":
        return _polygon(dx, dy, 4, 0.85 * r, d.angle)
    if shape == "triangle":
        return _polygon(dx, dy, 3, r, d.angle)
    u = np.cos(d.angle) * dx + np.sin(d.angle) * dy
    v = -np.sin(d.angle) * dx + np.cos(d.angle) * dy
    if shape == "cross":
        arm, width = 0.9 * r, 0.3 * r
        au, av = np.abs(u), np.abs(v)
        return ((au <= width) & (av <= arm)) | ((av <= width) & (au <= arm))
    if shape == "star":
        return _star(u, v, r)
    raise ValueError(f"unknown shape {shape!r}")


def _polygon(dx: np.ndarray, dy: np.ndarray, sides: int, r: float, angle: float) -> np.ndarray:
    """A regular polygon of circumradius ``r``: inside every edge's half-plane."""
    inradius = r * np.cos(np.pi / sides)
    inside = np.ones(dx.shape, dtype=bool)
    for k in range(sides):
        normal = angle + np.pi / sides + 2 * np.pi * k / sides
        inside &= np.cos(normal) * dx + np.sin(normal) * dy <= inradius
    return inside


def _star(u: np.ndarray, v: np.ndarray, r: float, points: int = 5) -> np.ndarray:
    """A five-pointed star: the boundary radius swings linearly between tips and notches."""
    phi = np.arctan2(v, u)
    t = (phi * points / (2 * np.pi)) % 1.0
    boundary = 0.4 * r + 0.6 * r * np.abs(1.0 - 2.0 * t)
    return u * u + v * v <= boundary * boundary


# --- a split as a whole --------------------------------------------------------------------


class ShapesSplit:
    """One split of the synthetic data set: ``len``, and per-index image, label, group, caption."""

    def __init__(
        self, split: str, *, seed: int = 0, size: int | None = None, image_size: int = IMAGE_SIZE
    ) -> None:
        if split not in SPLIT_SIZES:
            raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLIT_SIZES)})")
        self.split = split
        self.seed = seed
        self.size = SPLIT_SIZES[split] if size is None else size
        self.image_size = image_size

    def __len__(self) -> int:
        return self.size

    def image(self, index: int) -> Image.Image:
        """The RGB image at ``index``."""
        return image(self.split, index, self.seed, self.image_size)

    def caption(self, index: int) -> str:
        """The caption of the image at ``index``."""
        return caption(self.split, index, self.seed)

    def labels(self) -> np.ndarray:
        """The class index of every image, int64."""
        return np.array([d.label for d in self._draws()], dtype=np.int64)

    def groups(self) -> np.ndarray:
        """The background style (group id) of every image, int64."""
        return np.array([d.background for d in self._draws()], dtype=np.int64)

    def _draws(self) -> list[Draw]:
        return [draw(self.split, i, self.seed) for i in range(self.size)]


def fingerprint(split: ShapesSplit) -> str:
    """What decides a split's pixels: the generator's parameters and its own code.

    The images are a pure function of ``(seed, split, index)`` and this module's drawing code,
    so a hash of this file stands for any change to how they are drawn.
    """
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    return (f"synthetic split={split.split} seed={split.seed} size={split.size} "
            f"image_size={split.image_size} code={code}")
