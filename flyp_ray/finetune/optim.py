"""The optimizer and learning-rate schedule of a run: AdamW, linear warm-up, cosine decay.

Everything that decides a parameter update besides the loss lives here (and the logit-scale
clamp, :func:`flyp_ray.finetune.model.clamp_logit_scale`), so the recipe can be read, and
compared with the FLYP reference's, in one place: ``train.recipe`` and its fields
(:data:`flyp_ray.config.RECIPES`), docs/FIDELITY.md, tests/finetune/test_recipe.py.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from flyp_ray.config import TrainConfig, resolve_recipe
from flyp_ray.finetune.checkpoint import TrainingState
from flyp_ray.finetune.evaluate import unwrap


def is_gain_or_bias(name: str, param: torch.nn.Parameter) -> bool:
    """open_clip's exclusion rule: 1-d parameters, biases, norm layers and the logit scale."""
    return (param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name
            or "logit_scale" in name)


def param_groups(model: torch.nn.Module, train: TrainConfig) -> list[dict[str, Any]]:
    """The trainable parameters, with the weight decay each group gets under ``train``'s recipe.

    The FLYP reference decays every trainable parameter (one group, as its ``AdamW(params, ...)``
    call does); CLIP's recipe exempts gains, biases and the logit scale.
    """
    named = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
    if resolve_recipe(train).decay_gains_biases:
        return [{"params": [p for _, p in named], "weight_decay": train.weight_decay}]
    return [{"params": [p for n, p in named if is_gain_or_bias(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not is_gain_or_bias(n, p)],
             "weight_decay": train.weight_decay}]


def build_optimizer(model: torch.nn.Module, train: TrainConfig,
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW over every trainable parameter, with the betas, eps and decay of ``train.recipe``.

    Every method uses it: the reference's FLYP, its CE ablation and WiSE-FT's finetuning all
    make the same ``torch.optim.AdamW(params, lr=lr, weight_decay=wd)`` call.
    """
    recipe = resolve_recipe(train)
    assert recipe.adam_beta1 is not None and recipe.adam_beta2 is not None  # for mypy: resolved
    assert recipe.adam_eps is not None
    # fused: one CUDA kernel for the whole update; the reference's default (foreach) computes the
    # same update, and may differ from it in the last bits.
    return torch.optim.AdamW(param_groups(model, train), lr=train.lr,
                             betas=(recipe.adam_beta1, recipe.adam_beta2), eps=recipe.adam_eps,
                             fused=device.type == "cuda")


def lr_factor(step: int, train: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay, never below ``min_lr`` (as a factor of lr).

    The reference's ``cosine_lr`` (src/models/utils.py) has the same warm-up and cosine but
    *adds* ``min_lr`` to the cosine, so its rate ends at ``min_lr`` and peaks at ``lr + min_lr``
    right after warm-up. Here ``min_lr`` is a floor: the peak is ``lr`` as configured. With
    ``min_lr`` 0 (the reference's default and every command in its README) the two agree.
    """
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


def adopt_values(state: TrainingState, model: torch.nn.Module, train: TrainConfig) -> None:
    """Give a restored optimizer and schedule ``train``'s rate, floor and decay, keeping the
    Adam moments and the step count.

    Loading a checkpoint's state dicts brings back the rate and decay it was trained with. A run
    that continues another run's checkpoint with other values (population-based training's
    explore step) trains on with its own: the schedule's shape stays, scaled to the new ``lr``.
    """
    groups = state.optimizer.param_groups
    for group, fresh in zip(groups, param_groups(model, train), strict=True):
        group["weight_decay"] = fresh["weight_decay"]
        group["initial_lr"] = train.lr
    scheduler = state.scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)  # build_state's
    scheduler.base_lrs = [train.lr] * len(groups)
    for group, factor in zip(groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = train.lr * factor(scheduler.last_epoch)
