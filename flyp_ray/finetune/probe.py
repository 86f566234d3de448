"""The linear probe: a head fitted on frozen image features, regularisation chosen on id_val.

The head starts from the zero-shot head and is pulled back towards it by an L2 penalty,
``l2 / 2 * ||W - W_zero_shot||^2``: a strong penalty gives the zero-shot classifier, none the
plain logistic regression, so the grid spans the two. Each strength is fitted with full-batch
L-BFGS on the training features and scored on ``id_val`` features; test splits are never read
here (``tests/finetune/test_methods.py`` makes reading one fail).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset

from flyp_ray.data import cache, fewshot
from flyp_ray.data.base import ImageDataset, Split
from flyp_ray.errors import DataError
from flyp_ray.finetune.evaluate import embed, gather, unwrap
from flyp_ray.finetune.run import Run

log = logging.getLogger(__name__)

SELECT_SPLIT = "id_val"  # FLYP's protocol: everything is chosen on ID validation data
LBFGS_ITERATIONS = 200


def eval_view(split: Split, like: Split) -> Split:
    """``split`` with ``like``'s eval transform: the probe sees unaugmented training images."""
    return dataclasses.replace(split, dataset=_with_transform(split.dataset, like.dataset),
                               prepare=like.prepare)


def _with_transform(dataset: Dataset[Any], like: Dataset[Any]) -> Dataset[Any]:
    if isinstance(dataset, fewshot.Drawn):
        return fewshot.Drawn(_with_transform(dataset.dataset, like), dataset.indices)
    if isinstance(dataset, ImageDataset) and isinstance(like, ImageDataset):
        return ImageDataset(dataset.read, dataset.positions, dataset.labels, like.transform)
    if isinstance(dataset, cache.CachedImages):
        return dataset  # cached pixels are unaugmented; the eval split's prepare finishes them
    return dataset


def features(run: Run, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """All workers' unit image features of ``split`` and their labels, in item order."""
    local = embed(run.model, split, batch_size=run.train.eval_batch_size, device=run.device,
                  precision=run.train.precision, rank=run.rank, world_size=run.world_size,
                  num_workers=run.eval_workers)
    feats, indices = gather(local, run.world_size)
    return feats, split.labels[indices]


def fit_head(feats: torch.Tensor, labels: torch.Tensor, start: torch.Tensor, scale: float,
             l2: float) -> torch.Tensor:
    """The head minimising cross-entropy plus the pull towards ``start``, by L-BFGS."""
    head = start.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([head], lr=1.0, max_iter=LBFGS_ITERATIONS,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(scale * feats @ head, labels)
        loss = loss + 0.5 * l2 * (head - start).pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head.detach()


def choose(train: tuple[torch.Tensor, torch.Tensor], select: tuple[torch.Tensor, torch.Tensor],
           start: torch.Tensor, scale: float, grid: list[float]) -> tuple[torch.Tensor, float]:
    """Fit a head per strength on ``train`` and keep the most accurate on ``select``.

    Ties go to the stronger penalty: the head closer to zero-shot is the safer one under shift.
    """
    best: tuple[float, float, torch.Tensor] | None = None
    for l2 in sorted(grid, reverse=True):
        head = fit_head(*train, start, scale, l2)
        acc = float(((scale * select[0] @ head).argmax(1) == select[1]).float().mean())
        log.info("linear probe: l2 %g, %s accuracy %.4f", l2, SELECT_SPLIT, acc)
        if best is None or acc > best[0]:
            best = (acc, l2, head)
    assert best is not None  # the config check refuses an empty grid
    return best[2], best[1]


def fit_probe(run: Run) -> dict[str, float]:
    """Fit the linear head of ``run``'s classifier in place; returns ``lp/l2`` (the chosen one)."""
    splits = run.data.splits
    if SELECT_SPLIT not in splits:
        raise DataError(f"train.method {run.train.method}: the linear probe chooses its "
                        f"regularisation on {SELECT_SPLIT}, which this data set does not have")
    classifier = unwrap(run.model)
    train = features(run, eval_view(splits["train"], splits[SELECT_SPLIT]))
    select = features(run, splits[SELECT_SPLIT])
    scale = float(classifier.logit_scale.exp())
    start = classifier.head.detach().float().cpu()
    head, l2 = choose(train, select, start, scale, run.train.lp_l2)
    if run.world_size > 1:
        # Every worker fitted the same problem; rank 0's answer makes them bit-identical.
        head = head.to(run.device)
        dist.broadcast(head, src=0)
    with torch.no_grad():
        classifier.head.copy_(head.to(classifier.head.device))
    return {"lp/l2": l2}
