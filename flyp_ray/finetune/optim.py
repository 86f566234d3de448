"""The optimizer and learning-rate schedule of a run: AdamW, linear warm-up, cosine decay.

Everything that decides a parameter update besides the loss lives here, so the recipe can be
read (and compared with the FLYP reference's) in one place.
"""

from __future__ import annotations

import math

import torch

from flyp_ray.config import TrainConfig
from flyp_ray.finetune.checkpoint import TrainingState
from flyp_ray.finetune.evaluate import unwrap


def build_optimizer(model: torch.nn.Module, train: TrainConfig,
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW over every trainable parameter; no weight decay on gains, biases and logit scale."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in unwrap(model).named_parameters():
        if not param.requires_grad:
            continue
        # CLIP's recipe: decaying 1-d parameters (norm gains, biases) or the temperature hurts.
        exempt = param.ndim < 2 or "logit_scale" in name or "bias" in name
        (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(0.9, 0.98), eps=1e-6,
                             fused=device.type == "cuda")


def lr_factor(step: int, train: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay, never below ``min_lr`` (as a factor of lr)."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    decay_steps = max(1, total_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return max(train.min_lr / train.lr, cosine)


def build_state(model: torch.nn.Module, train: TrainConfig, total_steps: int,
                device: torch.device) -> TrainingState:
    """Optimizer, schedule and (fp16 only) loss scaler for ``total_steps`` optimizer steps."""
    optimizer = build_optimizer(model, train, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, train, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=train.precision == "fp16")
    return TrainingState(optimizer, scheduler, scaler)
