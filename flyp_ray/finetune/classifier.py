"""CLIP's image tower with a linear head over its unit-length features.

One shape for every method's classifier: ``exp(logit_scale) * normalize(visual(x)) @ head``.
FLYP's head is the zero-shot head of its finetuned text tower; the cross-entropy baselines
(``ce``, ``lp``, ``lpft``) start from the pretrained zero-shot head and train it. Keeping the
zero-shot form (unit features, CLIP's fixed logit scale, head [embed_dim, classes]) means the
zero-shot model *is* such a classifier, which is what WiSE-FT interpolates from.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.nn.functional as F

C = TypeVar("C", bound="ImageClassifier")


class ImageClassifier(torch.nn.Module):
    """Images in, logits out; ``encode_image`` and ``logit_scale`` mirror the CLIP model.

    The mirror lets :func:`flyp_ray.finetune.evaluate.evaluate_splits` evaluate a classifier with
    its ``head`` exactly as it evaluates CLIP with a zero-shot head.
    """

    head: torch.Tensor
    logit_scale: torch.Tensor

    def __init__(self, visual: torch.nn.Module, head: torch.Tensor, logit_scale: torch.Tensor,
                 *, trainable_head: bool = False) -> None:
        super().__init__()
        self.visual = visual
        head = head.detach().float().clone()  # [embed_dim, classes]
        if trainable_head:
            self.head = torch.nn.Parameter(head)
        else:
            self.register_buffer("head", head)
        # Never trained here: the baselines keep CLIP's scale, so that their starting point
        # computes the zero-shot logits exactly as the CLIP model does.
        self.register_buffer("logit_scale", logit_scale.detach().float().reshape(()).clone())

    @classmethod
    def from_clip(cls: type[C], clip: Any, head: torch.Tensor, *,
                  trainable_head: bool = False) -> C:
        """The classifier of a CLIP model with ``head`` (its logit scale, its image tower)."""
        return cls(clip.visual, head, clip.logit_scale, trainable_head=trainable_head)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image features, unit length with ``normalize`` (CLIP's signature)."""
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits, shape [N, classes]."""
        return self.logit_scale.exp() * self.encode_image(images, normalize=True) @ self.head
