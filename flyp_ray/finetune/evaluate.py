"""Evaluation: the zero-shot head rebuilt from the text tower, and metrics on every split.

FLYP evaluates with the zero-shot head of the *finetuned* text tower: template-averaged,
normalised class embeddings (open_clip's ``build_zero_shot_classifier``). Metrics come from
WILDS' metric classes, so ``macro_f1`` and ``worst_group_acc`` mean what they mean in WILDS.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip import build_zero_shot_classifier
from torch.utils.data import DataLoader, Subset
from wilds.common.metrics.all_metrics import F1, Accuracy

from flyp_ray.data.base import Split


def unwrap(model: torch.nn.Module) -> Any:
    """The CLIP model inside a DistributedDataParallel wrapper (or the model itself).

    Typed ``Any``: open_clip's models (CLIP, CustomTextCLIP) share ``encode_image``,
    ``encode_text`` and ``logit_scale`` without a common typed interface.
    """
    return getattr(model, "module", model)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[None]:
    """Mixed precision for bf16/fp16; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def zero_shot_head(model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor],
                   classnames: Sequence[str], templates: Sequence[str],
                   device: torch.device) -> torch.Tensor:
    """Normalised, template-averaged class embeddings, shape [embed_dim, num_classes]."""
    clip = unwrap(model)
    was_training = clip.training
    clip.eval()
    head = build_zero_shot_classifier(clip, tokenizer, classnames, templates,
                                      num_classes_per_batch=64, device=device)
    clip.train(was_training)
    return head.float()


def classification_metrics(y_pred: torch.Tensor, y_true: torch.Tensor,
                           groups: torch.Tensor | None) -> dict[str, float]:
    """``acc``, ``macro_f1`` and, with groups, ``worst_group_acc`` (WILDS' definitions)."""
    out = {
        "acc": Accuracy().compute(y_pred, y_true)["acc_avg"],
        "macro_f1": F1(average="macro").compute(y_pred, y_true)["F1-macro_all"],
    }
    if groups is not None and len(groups):
        out["worst_group_acc"] = worst_group_accuracy(y_pred, y_true, groups)
    return {k: float(v) for k, v in out.items()}


def worst_group_accuracy(y_pred: torch.Tensor, y_true: torch.Tensor,
                         groups: torch.Tensor) -> float:
    """The lowest accuracy over the groups present (WILDS' ``acc_wg``).

    Computed with bincount: WILDS' own group-wise path needs torch_scatter, a compiled
    extension with no wheels for current torch.
    """
    correct = torch.bincount(groups, weights=(y_pred == y_true).double())
    counts = torch.bincount(groups).double()
    present = counts > 0
    return float((correct[present] / counts[present]).min())


@torch.no_grad()
def embed(model: torch.nn.Module, split: Split, *, batch_size: int, device: torch.device,
          precision: str, rank: int = 0, world_size: int = 1,
          num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-length image features (float32, on the CPU) and item indices of this worker's share
    of ``split`` (every world_size-th item)."""
    clip = unwrap(model)
    was_training = clip.training
    clip.eval()
    # A strided shard instead of a DistributedSampler: the sampler pads with repeats, which
    # would count some images twice in the metrics.
    shard = Subset(split.dataset, range(rank, len(split.labels), world_size))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    features, indices = [], []
    for images, _, index in loader:
        images = images.to(device, non_blocking=True)
        if split.prepare is not None:  # cached uint8 pixels (dataset.cache)
            images = split.prepare(images)
        with autocast(device, precision):
            features.append(clip.encode_image(images, normalize=True).float().cpu())
        indices.append(index)
    clip.train(was_training)
    if not features:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(features), torch.cat(indices)


@torch.no_grad()
def predict(model: torch.nn.Module, head: torch.Tensor, split: Split, *, batch_size: int,
            device: torch.device, precision: str, rank: int = 0, world_size: int = 1,
            num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and item indices for this worker's share of ``split`` (every world_size-th item)."""
    features, indices = embed(model, split, batch_size=batch_size, device=device,
                              precision=precision, rank=rank, world_size=world_size,
                              num_workers=num_workers)
    if not len(indices):
        return torch.empty(0, head.shape[1]), indices
    scale = unwrap(model).logit_scale.exp().float().cpu()
    return scale * features @ head.cpu(), indices


def gather(tensors: tuple[torch.Tensor, torch.Tensor],
           world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every worker's (logits, indices), ordered by index."""
    if world_size > 1:
        parts: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * world_size
        dist.all_gather_object(parts, tensors)
        logits = torch.cat([p[0] for p in parts if p is not None])
        indices = torch.cat([p[1] for p in parts if p is not None])
    else:
        logits, indices = tensors
    order = torch.argsort(indices)
    return logits[order], indices[order]


def project_logits(logits: torch.Tensor, class_map: torch.Tensor) -> torch.Tensor:
    """Logits over a split's own classes: each takes the highest logit of the model classes
    ``class_map`` sends to it (see :class:`flyp_ray.data.Split`); shape [N, split classes]."""
    keep = (class_map >= 0).to(logits.device)
    targets = class_map.to(logits.device)[keep]
    rows = logits.shape[0]
    out = torch.full((rows, int(targets.max()) + 1), float("-inf"), dtype=logits.dtype,
                     device=logits.device)
    return out.scatter_reduce(1, targets.expand(rows, -1), logits[:, keep], reduce="amax")


def split_metrics(split: Split, logits: torch.Tensor, indices: torch.Tensor) -> dict[str, float]:
    """All metrics of one split, named ``{split}/{name}``; WILDS' own ones under ``official``.

    A split with a ``class_map`` (ImageNet-R/A, ObjectNet) is scored on its own classes.
    """
    if split.class_map is not None:
        logits = project_logits(logits, split.class_map)
    y_true = split.labels[indices]
    y_pred = logits.argmax(dim=1)
    groups = split.groups[indices] if split.groups is not None else None
    metrics = classification_metrics(y_pred, y_true, groups)
    metrics["loss"] = float(F.cross_entropy(logits, y_true))
    if split.official_eval is not None:
        official = split.official_eval(y_pred, y_true, indices)
        metrics.update({f"official/{k}": float(v) for k, v in official.items()})
    return {f"{split.name}/{k}": v for k, v in metrics.items()}


def evaluate_splits(model: torch.nn.Module, head: torch.Tensor, splits: Iterable[Split], *,
                    batch_size: int, device: torch.device, precision: str, rank: int = 0,
                    world_size: int = 1, num_workers: int = 0) -> dict[str, float]:
    """Metrics of every split, computed on all workers' shards and identical on every worker.

    With several OOD sets (splits ``ood_test/<set>``), ``ood_test/<name>`` is their average.
    """
    metrics: dict[str, float] = {}
    ood_sets = []
    for split in splits:
        local = predict(model, head, split, batch_size=batch_size, device=device,
                        precision=precision, rank=rank, world_size=world_size,
                        num_workers=num_workers)
        logits, indices = gather(local, world_size)
        metrics.update(split_metrics(split, logits, indices))
        if split.name.startswith("ood_test/"):
            ood_sets.append(split.name)
    return {**metrics, **ood_averages(metrics, ood_sets)}


def ood_averages(metrics: dict[str, float], ood_sets: Sequence[str]) -> dict[str, float]:
    """``ood_test/<name>``: the mean of ``<set>/<name>`` over the OOD set splits ``ood_sets``.

    Only the OOD sets count, never an ID split, and only metrics that every set has. The FLYP
    reference's "Avg OOD Acc" (flyp_loss.py) averages every evaluated set but the one named
    "ImageNet": right for ImageNet, but on iWildCam or FMoW it averages the ID splits in too.
    """
    if not ood_sets:
        return {}
    per_set = [{k.removeprefix(f"{s}/"): v for k, v in metrics.items() if k.startswith(f"{s}/")}
               for s in ood_sets]
    shared = set.intersection(*(set(m) for m in per_set))
    return {f"ood_test/{name}": sum(m[name] for m in per_set) / len(per_set)
            for name in sorted(shared)}
