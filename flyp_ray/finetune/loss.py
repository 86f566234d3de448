"""The FLYP loss: CLIP's symmetric contrastive loss between images and their class prompts.

Built on open_clip's :class:`ClipLoss`, which gathers features from every worker with gradient,
so the loss sees the negatives of the whole global batch. What FLYP adds is the choice of what to
do with two pairs of the same class in one batch (their prompts may even be identical):

- ``negative``: the plain CLIP loss; the other same-class prompts are negatives (FLYP's choice).
- ``mask``: same-class columns other than the pair itself leave the softmax denominator.
- ``positive``: every same-class column is a target, with equal weight (multi-positive).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from flyp_ray.config import SameClass


class FlypLoss(ClipLoss):
    """ClipLoss with class-aware targets; takes its distributed context as arguments."""

    def __init__(
        self,
        same_class: SameClass = "negative",
        *,
        local_loss: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        # gather_with_grad: without it, a worker's loss would not send gradient to the features
        # it received from other workers, and data parallel would differ from one big batch.
        super().__init__(local_loss=local_loss, gather_with_grad=True, rank=rank,
                         world_size=world_size)
        self.same_class = same_class

    def forward(  # type: ignore[override]
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean of the image->text and text->image cross-entropies over the global batch."""
        if self.same_class == "negative":
            return super().forward(image_features, text_features, logit_scale)
        if labels is None:
            raise ValueError(f"same_class={self.same_class!r} needs the class labels")
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features,
                                                            logit_scale)
        targets = self.get_ground_truth(image_features.device, logits_per_image.shape[0])
        rows, cols = self._row_and_column_labels(labels)
        same = rows[:, None] == cols[None, :]
        return (self._one_side(logits_per_image, targets, same)
                + self._one_side(logits_per_text, targets, same)) / 2

    def _row_and_column_labels(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class labels of the logit rows (local or global) and columns (always global)."""
        if self.world_size == 1:
            return labels, labels
        gathered = [torch.empty_like(labels) for _ in range(self.world_size)]
        dist.all_gather(gathered, labels)
        everyone = torch.cat(gathered)
        return (labels if self.local_loss else everyone), everyone

    def _one_side(self, logits: torch.Tensor, targets: torch.Tensor,
                  same: torch.Tensor) -> torch.Tensor:
        pair = F.one_hot(targets, logits.shape[1]).bool()
        if self.same_class == "mask":
            masked = logits.masked_fill(same & ~pair, float("-inf"))
            return F.cross_entropy(masked, targets)
        weights = same.float() / same.sum(dim=1, keepdim=True)
        return -(weights * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
