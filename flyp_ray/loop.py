"""The training loop in plain PyTorch: no Ray in here, so it runs and tests in one process.

One epoch is one pass over the training images. Every epoch ends with the zero-shot head rebuilt
from the current text tower and every split evaluated; the caller decides what to do with the
metrics (the Ray worker reports and checkpoints them).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from flyp_ray.checkpoint import TrainingState
from flyp_ray.config import TrainConfig
from flyp_ray.data import Data
from flyp_ray.errors import BadInput, TrialDiverged
from flyp_ray.evaluate import autocast, evaluate_splits, unwrap, zero_shot_head
from flyp_ray.loss import FlypLoss
from flyp_ray.model import clamp_logit_scale

Report = Callable[[int, dict[str, float]], None]

TRAINED_METHODS = ("flyp",)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_method(train: TrainConfig) -> None:
    """Refuse methods this loop cannot run yet, before any work starts."""
    if train.method not in (*TRAINED_METHODS, "zeroshot"):
        raise BadInput(f"train.method: {train.method!r} is not available yet "
                       f"(available: {', '.join((*TRAINED_METHODS, 'zeroshot'))})")


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


def prompt_tokens(tokenizer: Callable[..., torch.Tensor], classnames: Sequence[str],
                  templates: Sequence[str]) -> torch.Tensor:
    """Token ids of every (class, template) prompt, shape [classes, templates, context]."""
    texts = [t.format(c) for c in classnames for t in templates]
    tokens = tokenizer(texts)
    return tokens.view(len(classnames), len(templates), -1)


def draw_prompts(tokens: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
    """One prompt per image: its class with a template drawn at random (FLYP's pairing)."""
    choice = torch.randint(tokens.shape[1], (labels.shape[0],), generator=generator)
    return tokens[labels.cpu(), choice]


@dataclasses.dataclass
class Run:
    """Everything one worker's training needs, built once."""

    model: torch.nn.Module  # the CLIP model, possibly wrapped in DistributedDataParallel
    data: Data
    tokenizer: Callable[..., torch.Tensor]
    train: TrainConfig
    loader: DataLoader  # the training split, already sharded across workers
    loss_fn: FlypLoss
    state: TrainingState
    prompts: torch.Tensor
    device: torch.device
    rank: int = 0
    world_size: int = 1
    eval_workers: int = 0


def apply_speed_options(model: torch.nn.Module, train: TrainConfig) -> None:
    """Gradient checkpointing and ``torch.compile``, in place, as ``train`` asks.

    Both act on the CLIP model inside any DDP wrapper, so state-dict keys and ``unwrap`` stay
    as they are. Compiling in place covers the training forward; the evaluation calls
    ``encode_image``, which stays eager.
    """
    clip = unwrap(model)
    if train.grad_checkpointing:
        # open_clip recomputes each transformer block in backward; a ResNet tower ignores it.
        clip.set_grad_checkpointing(True)  # type: ignore[operator]
    if train.compile:
        clip.compile()


def make_run(model: torch.nn.Module, data: Data, tokenizer: Callable[..., torch.Tensor],
             train: TrainConfig, loader: DataLoader, device: torch.device, *, rank: int = 0,
             world_size: int = 1, eval_workers: int = 0) -> Run:
    """Assemble a Run: loss with the distributed context, prompt tokens, optimizer state."""
    apply_speed_options(model, train)
    loss_fn = FlypLoss(train.same_class, local_loss=train.local_loss, rank=rank,
                       world_size=world_size)
    total_steps = max(1, train.epochs * len(loader))
    state = build_state(model, train, total_steps, device)
    tokens = prompt_tokens(tokenizer, data.classnames, data.templates)
    return Run(model, data, tokenizer, train, loader, loss_fn, state, tokens, device, rank,
               world_size, eval_workers)


def flyp_step(run: Run, images: torch.Tensor, labels: torch.Tensor,
              generator: torch.Generator) -> torch.Tensor:
    """Forward both towers on (image, drawn prompt) pairs and return the FLYP loss."""
    texts = draw_prompts(run.prompts, labels, generator).to(run.device, non_blocking=True)
    images = images.to(run.device, non_blocking=True)
    prepare = run.data.splits["train"].prepare
    if prepare is not None:  # cached uint8 pixels: crop, flip and normalise here, per batch
        images = prepare(images)
    labels = labels.to(run.device, non_blocking=True)
    with autocast(run.device, run.train.precision):
        out = run.model(images, texts)
        return run.loss_fn(out["image_features"].float(), out["text_features"].float(),
                           out["logit_scale"].float(), labels)


def optimizer_step(run: Run, loss: torch.Tensor) -> None:
    """Backward, optional clipping, step, schedule, and CLIP's logit-scale clamp."""
    state = run.state
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if run.train.grad_clip is not None:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.train.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    clamp_logit_scale(unwrap(run.model))


def all_finite(loss: torch.Tensor, world_size: int) -> bool:
    """Whether the loss is finite on every worker.

    With the global loss every worker sees the same value; with ``local_loss`` each sees its own
    rows, and all must agree to stop together (a lone stopping worker would hang the others).
    """
    finite = torch.isfinite(loss.detach()).float()
    if world_size > 1:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


def train_epoch(run: Run, epoch: int) -> dict[str, float]:
    """One pass over the training data: ``train/loss``, ``train/lr``, ``train/temperature``."""
    run.model.train()
    # Seeded per (seed, epoch, rank): a resumed run draws the same prompts as an uninterrupted one.
    generator = torch.Generator().manual_seed(run.train.seed * 100_003 + epoch * 101 + run.rank)
    total, count = 0.0, 0
    for step, (images, labels, _) in enumerate(run.loader):
        loss = flyp_step(run, images, labels, generator)
        if not all_finite(loss, run.world_size if run.train.local_loss else 1):
            raise TrialDiverged(f"loss is {loss.item()} at epoch {epoch}, step {step}")
        optimizer_step(run, loss)
        total += loss.item()
        count += 1
    scale = unwrap(run.model).logit_scale.exp().item()
    return {"train/loss": total / max(count, 1),
            "train/lr": run.state.optimizer.param_groups[0]["lr"],
            "train/temperature": 1.0 / scale}


def evaluate(run: Run, *, final: bool = True) -> dict[str, float]:
    """Rebuild the zero-shot head from the current text tower and evaluate the splits.

    Every split at the ``final`` epoch; before it, only ``train.eval_splits`` when that is set
    (a scheduler's early rungs need the search metric, not every split).
    """
    with autocast(run.device, run.train.precision):
        head = zero_shot_head(run.model, run.tokenizer, run.data.classnames, run.data.templates,
                              run.device)
    wanted = None if final else run.train.eval_splits
    splits = [s for name, s in run.data.splits.items()
              if name != "train" and (wanted is None or name in wanted)]
    return evaluate_splits(run.model, head, splits, batch_size=run.train.eval_batch_size,
                           device=run.device, precision=run.train.precision, rank=run.rank,
                           world_size=run.world_size, num_workers=run.eval_workers)


def run_epochs(run: Run, start_epoch: int, report: Report) -> None:
    """Train from ``start_epoch`` (the last finished one) to the end, reporting each epoch.

    ``zeroshot`` trains nothing: it reports the pretrained model's metrics as epoch 0.
    """
    if run.train.method == "zeroshot":
        report(0, {"epoch": 0, **evaluate(run)})
        return
    for epoch in range(start_epoch + 1, run.train.epochs + 1):
        final = epoch == run.train.epochs
        metrics = {"epoch": float(epoch), **train_epoch(run, epoch), **evaluate(run, final=final)}
        report(epoch, metrics)


def diverged_metrics(epoch: int, objectives: dict[str, str]) -> dict[str, float]:
    """What a diverged run reports: the worst value of each objective, and a flag.

    Reporting (rather than raising) lets the search record the trial as a bad point and go on;
    a raised error would also make Ray Train restart a run that will diverge again.
    """
    worst = {m: (0.0 if mode == "max" else math.inf) for m, mode in objectives.items()}
    return {"epoch": float(epoch), "diverged": 1.0, **worst}
