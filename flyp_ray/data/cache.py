"""A decode-once image cache: uint8 pixels at the model's resolution, augmented on the device.

Without it every epoch decodes every JPEG again and resizes it on the CPU, and a GPU that eats a
few thousand images per second starves. With ``dataset.cache`` set, each image is decoded,
resized and centre-cropped once (the model's own eval geometry) into a uint8 array; afterwards an
item costs a memory copy. What is random or float, the train transform's random resized crop and
flip and the normalisation, runs per batch on the device in :class:`DevicePrepare`.

- ``memory``: an anonymous shared mapping, filled lazily by whichever process reads an item
  first (forked DataLoader workers write into the same pages). Gone when the process ends.
- ``disk``: two files under ``cache_dir/<key>/`` on the node's local disk, memory-mapped, so
  trials on one node share the page cache and later trials start warm.

Eval splits come out identical to the uncached path (same resize and crop, then the same float
operations). The train split differs in one documented way: the random resized crop is taken
from the cached centre square at model resolution, not from the full-size original.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import mmap
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T

from flyp_ray.errors import ConfigError

IMAGES = "images.u8"
FILLED = "filled.u8"
META = "meta.json"
_TO_TENSOR = ("ToTensor", "MaybeToTensor")
_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before falling back


def default_dir() -> Path:
    """Where the disk cache goes when ``dataset.cache_dir`` is not set."""
    return Path(tempfile.gettempdir()) / "flyp_ray_cache"


# --- splitting the model's transforms ------------------------------------------------------


class ToUint8:
    """A PIL RGB image as a uint8 tensor [3, H, W] (what ToTensor sees, before it divides)."""

    def __call__(self, image: Any) -> torch.Tensor:
        pixels = np.asarray(image, dtype=np.uint8).copy()
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        # Stable across processes: the disk cache's key is built from the transform's repr.
        return "ToUint8()"


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a model's transforms split into a cached CPU part and a per-batch device part."""

    store: Callable[[Any], torch.Tensor]  # PIL image -> uint8 [3, size, size]
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_scale: tuple[float, float] | None  # the train transform's RandomResizedCrop, if any
    crop_ratio: tuple[float, float]
    flip: float  # probability of a horizontal flip in the train transform

    def prepare(self, train: bool) -> DevicePrepare:
        """The device-side rest of the train or the eval transform."""
        if not train:
            return DevicePrepare(self.mean, self.std)
        return DevicePrepare(self.mean, self.std, self.crop_scale, self.crop_ratio, self.flip)


def _steps(transform: Any, source: str) -> list[Any]:
    steps = getattr(transform, "transforms", None)
    if steps is None:
        raise ConfigError(source, "dataset.cache", f"needs a Compose transform, got {transform!r}")
    return list(steps)


def _split_at_tensor(transform: Any, source: str) -> tuple[list[Any], list[Any]]:
    steps = _steps(transform, source)
    names = [type(s).__name__ for s in steps]
    cut = next((i for i, n in enumerate(names) if n in _TO_TENSOR), None)
    if cut is None:
        raise ConfigError(source, "dataset.cache", f"no ToTensor in the model's transform {names}")
    return steps[:cut], steps[cut + 1:]


def _normalize(after: Sequence[Any], source: str) -> T.Normalize:
    if len(after) != 1 or not isinstance(after[0], T.Normalize):
        names = [type(s).__name__ for s in after]
        raise ConfigError(source, "dataset.cache",
                          f"expects only Normalize after ToTensor, got {names}")
    return after[0]


def _size(step: Any) -> int:
    size = step.size
    if isinstance(size, int):
        return size
    if len(size) == 1 or size[0] == size[1]:
        return int(size[0])
    raise ValueError(f"non-square size {size}")


def plan(train_transform: Any, eval_transform: Any, source: str) -> Plan:
    """Split open_clip's transforms: eval geometry for the store, the rest for the device.

    Refuses (ConfigError on ``dataset.cache``) a train transform with a step it cannot move to
    the device, such as colour jitter, rather than silently dropping it.
    """
    geometry, after = _split_at_tensor(eval_transform, source)
    norm = _normalize(after, source)
    crops = [s for s in geometry if isinstance(s, T.CenterCrop)]
    if not crops:
        raise ConfigError(source, "dataset.cache", "the model's eval transform has no CenterCrop")
    size = _size(crops[-1])
    train_geometry, train_after = _split_at_tensor(train_transform, source)
    _normalize(train_after, source)
    scale, ratio, flip = None, (1.0, 1.0), 0.0
    for step in train_geometry:
        if isinstance(step, T.RandomResizedCrop):
            scale, ratio = tuple(step.scale), tuple(step.ratio)
        elif isinstance(step, T.RandomHorizontalFlip):
            flip = float(step.p)
        elif type(step).__name__ not in ("MaybeConvertMode", "_convert_to_rgb", "function"):
            raise ConfigError(source, "dataset.cache", f"cannot apply the train step "
                              f"{type(step).__name__} on the device; set dataset.cache: none")
    return Plan(store=T.Compose([*geometry, ToUint8()]), size=size,  # type: ignore[arg-type]
                mean=tuple(norm.mean), std=tuple(norm.std), crop_scale=scale, crop_ratio=ratio,
                flip=flip)


# --- the device part -----------------------------------------------------------------------


class DevicePrepare:
    """uint8 batch [B, 3, S, S] on the device -> normalised float; random crop when training."""

    def __init__(self, mean: Sequence[float], std: Sequence[float],
                 crop_scale: tuple[float, float] | None = None,
                 crop_ratio: tuple[float, float] = (1.0, 1.0), flip: float = 0.0) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.crop_scale = crop_scale
        self.crop_ratio = crop_ratio
        self.flip = flip

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # The same operations in the same order as ToTensor + Normalize: eval batches match
        # the uncached path exactly.
        x = images.float().div(255)
        if self.crop_scale is not None or self.flip > 0:
            x = self._crop_and_flip(x)
        device = x.device
        return x.sub_(self.mean.to(device)).div_(self.std.to(device))

    def _crop_and_flip(self, x: torch.Tensor) -> torch.Tensor:
        theta = crop_boxes(x.shape[0], self.crop_scale or (1.0, 1.0), self.crop_ratio, self.flip,
                           x.shape[-1])
        grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
        return out.clamp_(0.0, 1.0)  # bicubic overshoots; PIL's resize clamps to 0..255 as well


def crop_boxes(batch: int, scale: tuple[float, float], ratio: tuple[float, float], flip: float,
               size: int) -> torch.Tensor:
    """Affine matrices [B, 2, 3] of torchvision's RandomResizedCrop boxes on a size x size image.

    Same sampling as ``RandomResizedCrop.get_params`` (area fraction uniform in ``scale``, log
    aspect ratio uniform in ``ratio``, first of 10 tries that fits, else the whole image),
    drawn from torch's global generator, for a whole batch at once.
    """
    area = float(size * size)
    target = area * torch.empty(batch, _CROP_ATTEMPTS).uniform_(scale[0], scale[1])
    log_ratio = torch.empty(batch, _CROP_ATTEMPTS).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    fits = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first try that fits (0 if none does)
    any_fits = fits.any(dim=1)
    w = torch.where(any_fits, w.gather(1, first).squeeze(1), torch.tensor(float(size)))
    h = torch.where(any_fits, h.gather(1, first).squeeze(1), torch.tensor(float(size)))
    top = (torch.rand(batch) * (size - h + 1)).floor()
    left = (torch.rand(batch) * (size - w + 1)).floor()
    sign = torch.where(torch.rand(batch) < flip, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3)
    # affine_grid maps output [-1, 1] to input coordinates; the box spans pixels left..left+w.
    theta[:, 0, 0] = sign * w / size
    theta[:, 0, 2] = (2 * left + w) / size - 1
    theta[:, 1, 1] = h / size
    theta[:, 1, 2] = (2 * top + h) / size - 1
    return theta


# --- the store -----------------------------------------------------------------------------


@dataclasses.dataclass
class Store:
    """uint8 pixels [N, 3, S, S] and a filled flag per item, both shared across processes."""

    images: np.ndarray
    filled: np.ndarray
    folder: Path | None  # the disk cache's folder; None in memory


def _anonymous(nbytes: int) -> np.ndarray:
    # MAP_SHARED | MAP_ANONYMOUS: pages are allocated on first write and shared with children
    # forked later (DataLoader workers), without the size limit of /dev/shm.
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=np.uint8, count=nbytes)


def memory_store(count: int, size: int) -> Store:
    """An empty in-memory store for ``count`` images of ``size`` x ``size``."""
    images = _anonymous(count * 3 * size * size).reshape(count, 3, size, size)
    return Store(images, _anonymous(count), None)


def disk_store(folder: Path, key: str, count: int, size: int) -> Store:
    """The store ``folder/key``, created empty if absent, else reopened with what it holds."""
    target = folder / key
    if not (target / META).is_file():
        _create(folder, target, count, size)
    return _open(target, count, size)


def _create(folder: Path, target: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=folder))
    with open(tmp / IMAGES, "wb") as f:
        f.truncate(count * 3 * size * size)  # sparse until written
    with open(tmp / FILLED, "wb") as f:
        f.truncate(count)
    (tmp / META).write_text(json.dumps({"count": count, "size": size, "layout": "NCHW uint8"}))
    try:
        os.rename(tmp, target)  # atomic; another process that got there first wins
    except OSError:
        for name in (IMAGES, FILLED, META):
            (tmp / name).unlink(missing_ok=True)
        tmp.rmdir()


def _open(target: Path, count: int, size: int) -> Store:
    meta = json.loads((target / META).read_text())
    if meta.get("count") != count or meta.get("size") != size:
        raise ConfigError(str(target), "dataset.cache_dir", f"holds {meta}, expected count "
                          f"{count} and size {size}; delete the folder")
    images = np.memmap(target / IMAGES, dtype=np.uint8, mode="r+", shape=(count, 3, size, size))
    filled = np.memmap(target / FILLED, dtype=np.uint8, mode="r+", shape=(count,))
    return Store(images, filled, target)


def cache_key(parts: dict[str, Any]) -> str:
    """A folder name from everything that determines a split's cached pixels."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class CachedImages(torch.utils.data.Dataset[tuple[torch.Tensor, int, int]]):
    """Items ``(uint8 image, label, index)`` of a data set whose transform gives uint8 pixels.

    An item is decoded through ``base`` the first time any process asks for it, and read from
    the store after that.
    """

    def __init__(self, base: Any, store: Store) -> None:
        self.base = base  # an ImageDataset whose transform is Plan.store
        self.store = store

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        if not self.store.filled[index]:
            image, _, _ = self.base[index]
            self.store.images[index] = image.numpy()
            self.store.filled[index] = 1  # after the pixels: a reader never sees half an image
        pixels = torch.from_numpy(np.array(self.store.images[index]))
        return pixels, int(self.base.labels[index]), index

    def __getstate__(self) -> dict[str, Any]:
        if self.store.folder is None:
            raise TypeError("dataset.cache: memory is shared with DataLoader workers by fork "
                            "only; with a spawn start method use dataset.cache: disk")
        return {"base": self.base, "folder": self.store.folder,
                "shape": self.store.images.shape}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.base = state["base"]
        count, _, size, _ = state["shape"]
        self.store = _open(state["folder"], count, size)

    def fill_count(self) -> int:
        """How many items are cached so far."""
        return int(np.count_nonzero(self.store.filled))


def fill_counter(dataset: Any) -> Callable[[], int] | None:
    """How many items of ``dataset``'s cache are filled (in every process), if it has one.

    Looks through wrappers that keep their data set in ``.dataset`` (a few-shot draw, a Subset).
    A rise between two readings is the number of images decoded in between.
    """
    while dataset is not None and not isinstance(dataset, CachedImages):
        dataset = getattr(dataset, "dataset", None)
    return dataset.fill_count if dataset is not None else None
