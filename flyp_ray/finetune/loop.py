"""The training loop in plain PyTorch: no Ray in here, so it runs and tests in one process.

One loop for every method (``train.method``), one data path and one evaluation:

- ``flyp``: CLIP's contrastive loss between images and prompts of their class; evaluated with
  the zero-shot head rebuilt from the current text tower.
- ``ce``: cross-entropy through the image tower and a head that starts as the zero-shot head.
- ``lp``: that head fitted on frozen image features (:mod:`flyp_ray.finetune.probe`), nothing else.
- ``lpft``: ``lp``, then ``ce`` from the fitted head (Kumar et al. 2022).
- ``zeroshot``: evaluation of the pretrained model only.

One epoch is one pass over the training images; every epoch ends with the splits evaluated, and
the last one with WiSE-FT's mixes when ``train.wiseft_alphas`` asks. The caller decides what to
do with the metrics (the Ray worker reports and checkpoints them).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from flyp_ray.data import cache
from flyp_ray.errors import TrialDiverged
from flyp_ray.finetune import probe, progress, wiseft
from flyp_ray.finetune.classifier import ImageClassifier
from flyp_ray.finetune.evaluate import autocast, evaluate_splits, unwrap
from flyp_ray.finetune.model import clamp_logit_scale
from flyp_ray.finetune.run import Run, text_head

log = logging.getLogger(__name__)

Report = Callable[[int, dict[str, float]], None]
# (optimizer steps so far, figures): a reading of the throughput every train.log_every_steps
Progress = Callable[[int, dict[str, float]], None]


def draw_prompts(tokens: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
    """One prompt per image: its class with a template drawn at random (FLYP's pairing).

    The draw comes from ``generator`` on the host; the indexing happens where ``tokens`` are,
    so that labels already on a GPU never travel back to the host (a sync every step).
    """
    choice = torch.randint(tokens.shape[1], (labels.shape[0],), generator=generator)
    where = tokens.device
    return tokens[labels.to(where, non_blocking=True), choice.to(where, non_blocking=True)]


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 if autocast left it in half precision, else as it is.

    The loss wants float32 at least: bf16/fp16 logits lose the softmax's small terms. Casting
    down a float64 model's outputs would lose what float64 is for: the step-by-step comparison
    with a written-out reference (tests/finetune/test_recipe.py) runs in float64 so that
    reduction-order noise stays near 1e-15 instead of float32's 1e-5.
    """
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def loss_step(run: Run, images: torch.Tensor, labels: torch.Tensor,
              generator: torch.Generator) -> torch.Tensor:
    """The batch's loss: FLYP's on (image, drawn prompt) pairs, else cross-entropy."""
    images = images.to(run.device, non_blocking=True)
    prepare = run.data.splits["train"].prepare
    if prepare is not None:  # cached uint8 pixels: crop, flip and normalise here, per batch
        images = prepare(images)
    if run.train.method != "flyp":
        labels = labels.to(run.device, non_blocking=True)
        with autocast(run.device, run.train.precision):
            return F.cross_entropy(run.model(images).float(), labels)
    if run.prompts.device != run.device:  # once: the prompt tokens live beside the model
        run.prompts = run.prompts.to(run.device)
    labels = labels.to(run.device, non_blocking=True)
    texts = draw_prompts(run.prompts, labels, generator)
    with autocast(run.device, run.train.precision):
        out = run.model(images, texts)
        return run.loss_fn(_at_least_fp32(out["image_features"]),
                           _at_least_fp32(out["text_features"]),
                           _at_least_fp32(out["logit_scale"]), labels)


def optimizer_step(run: Run, loss: torch.Tensor) -> None:
    """Backward, optional clipping, step, schedule, and the recipe's logit-scale clamp (none in
    FLYP's, at 100 in CLIP's)."""
    state = run.state
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if run.train.grad_clip is not None:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.train.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    clamp_logit_scale(unwrap(run.model), run.train.max_logit_scale)


def all_finite(value: float, world_size: int, device: torch.device) -> bool:
    """Whether a loss reading is finite on every worker.

    With the global loss every worker sees the same value; with ``local_loss`` each sees its own
    rows, and all must agree to stop together (a lone stopping worker would hang the others).
    """
    finite = math.isfinite(value)
    if world_size > 1:
        flag = torch.tensor(float(finite), device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        finite = bool(flag.item())
    return finite


def set_epoch(loader: object, epoch: int) -> None:
    """Reshuffle a DistributedSampler (more than one worker): without it every epoch of a
    data-parallel run would see its images in the same order."""
    set_sampler_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
    if set_sampler_epoch is not None:
        set_sampler_epoch(epoch)


def train_epoch(run: Run, epoch: int, report_progress: Progress | None = None) -> dict[str, float]:
    """One pass over the training data: ``train/loss``, ``train/lr``, ``train/temperature``."""
    return _train_epoch(run, epoch, report_progress)[0]


def _train_epoch(run: Run, epoch: int, report_progress: Progress | None
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """:func:`train_epoch`, and the epoch's throughput figures (:mod:`.progress`).

    The loss is summed on the device and read every ``train.log_every_steps`` steps and at the
    end: reading it forces the host to wait for the device, and doing that every step would
    stall the GPU between steps just to log a number. Divergence is caught at those readings:
    a non-finite loss makes the sum non-finite, so at most ``log_every_steps - 1`` steps run on
    after it before the trial stops, and they change nothing (a diverged trial keeps no weights).
    """
    run.model.train()
    set_epoch(run.loader, epoch)
    # Seeded per (seed, epoch, rank): a resumed run draws the same prompts as an uninterrupted one.
    generator = torch.Generator().manual_seed(run.train.seed * 100_003 + epoch * 101 + run.rank)
    every, steps = run.train.log_every_steps, len(run.loader)
    meter = progress.Meter(run.world_size, cache.fill_counter(run.data.splits["train"].dataset))
    pending = torch.zeros((), device=run.device)  # losses since the last reading, on the device
    total, count, first = 0.0, 0, 1
    batches = iter(run.loader)
    for step in range(1, steps + 1):
        asked = time.perf_counter()
        images, labels, _ = next(batches)
        waited = time.perf_counter() - asked
        loss = loss_step(run, images, labels, generator)
        optimizer_step(run, loss)
        pending += loss.detach()
        meter.step(labels.shape[0], waited)
        if step % every and step != steps:
            continue
        window = pending.item()  # the one host sync of the window
        if not all_finite(window, run.world_size if run.train.local_loss else 1, run.device):
            raise TrialDiverged(f"loss is {window} at epoch {epoch}, in steps {first}-{step}")
        pending.zero_()
        figures = meter.reading()
        if run.rank == 0 and step != steps:
            log.log(run.pace.level(), "epoch %d step %d/%d: %s, loss %.4g", epoch, step, steps,
                    progress.line(figures), window / (step - first + 1))
        total, count, first = total + window, step, step + 1
        if report_progress is not None:
            report_progress(run.state.scheduler.last_epoch,
                            {**figures, "epoch": epoch - 1 + step / steps})
    metrics = {"train/loss": total / max(count, 1),
               "train/lr": run.state.optimizer.param_groups[0]["lr"]}
    if run.train.method == "flyp":  # the baselines keep CLIP's scale fixed
        metrics["train/temperature"] = 1.0 / unwrap(run.model).logit_scale.exp().item()
    return metrics, meter.epoch_figures()


def head(run: Run) -> torch.Tensor:
    """The evaluation head: a classifier's own, or the zero-shot head of the text tower."""
    model = unwrap(run.model)
    if isinstance(model, ImageClassifier):
        return model.head.detach().float()
    return text_head(run.model, run.tokenizer, run.data, run.train, run.device)


def evaluate(run: Run, *, final: bool = True) -> dict[str, float]:
    """Evaluate the splits with the current head.

    Every split at the ``final`` epoch; before it, only ``train.eval_splits`` when that is set
    (a scheduler's early rungs need the search metric, not every split).
    """
    wanted = None if final else run.train.eval_splits
    splits = [s for name, s in run.data.splits.items()
              if name != "train" and (wanted is None or name in wanted)]
    return evaluate_splits(run.model, head(run), splits, batch_size=run.train.eval_batch_size,
                           device=run.device, precision=run.train.precision, rank=run.rank,
                           world_size=run.world_size, num_workers=run.eval_workers)


def final_metrics(run: Run, epoch: int) -> dict[str, float]:
    """Every split, and WiSE-FT's mixes of the starting weights and the epoch best on id_val
    when asked (the epoch FLYP selects; this one if no earlier epoch was better)."""
    metrics = evaluate(run)
    if run.train.wiseft_alphas and run.zero_shot is not None:
        model = unwrap(run.model)
        run.best.update(model, metrics, epoch)
        metrics.update(wiseft.evaluate_alphas(model, run.zero_shot, run.best.state,
                                              run.train.wiseft_alphas, lambda: evaluate(run)))
    return metrics


def interim_metrics(run: Run, epoch: int) -> dict[str, float]:
    """An epoch before the last: its splits, and with WiSE-FT asked, ``wiseft/best/...`` as far
    as known: the current weights (alpha 1) only, so that a ``wiseft/`` search objective has a
    value at every epoch for the scheduler; the full sweep runs once, at the end."""
    metrics = evaluate(run, final=False)
    if not run.train.wiseft_alphas:
        return metrics
    run.best.update(unwrap(run.model), metrics, epoch)
    return {**metrics, **{f"wiseft/best/{k}": v for k, v in metrics.items()},
            "wiseft/best/alpha": 1.0}


def run_epochs(run: Run, start_epoch: int, report: Report,
               report_progress: Progress | None = None) -> None:
    """Train from ``start_epoch`` (the last finished one) to the end, reporting each epoch.

    ``zeroshot`` trains nothing: it reports the pretrained model's metrics as epoch 0. ``lp``
    reports its one fit as epoch 1; ``lpft`` fits the probe before its first epoch.
    ``report_progress`` gets the throughput every ``train.log_every_steps`` steps.
    """
    method = run.train.method
    if method == "zeroshot":
        report(0, {"epoch": 0, **evaluate(run)})
        return
    fitted = probe.fit_probe(run) if method in ("lp", "lpft") and start_epoch == 0 else {}
    if method == "lp":
        report(1, {"epoch": 1, **fitted, **final_metrics(run, 1)})
        return
    for epoch in range(start_epoch + 1, run.train.epochs + 1):
        final = epoch == run.train.epochs
        trained, figures = _train_epoch(run, epoch, report_progress)
        metrics = {"epoch": float(epoch), **(fitted if epoch == 1 else {}), **trained}
        evaluating = time.perf_counter()
        metrics.update(final_metrics(run, epoch) if final else interim_metrics(run, epoch))
        if run.rank == 0:
            # The epoch's summary: where its time went, and whether the GPU waited for data.
            log.log(run.pace.level(), "epoch %d/%d: train %.1f s (%s), eval %.1f s, "
                    "train/loss %.4g", epoch, run.train.epochs, figures["seconds"],
                    progress.line(figures), time.perf_counter() - evaluating,
                    trained["train/loss"])
        report(epoch, metrics)


def diverged_metrics(epoch: int, objectives: dict[str, str]) -> dict[str, float]:
    """What a diverged run reports: the worst value of each objective, and a flag.

    Reporting (rather than raising) lets the search record the trial as a bad point and go on;
    a raised error would also make Ray Train restart a run that will diverge again.
    """
    worst = {m: (0.0 if mode == "max" else math.inf) for m, mode in objectives.items()}
    return {"epoch": float(epoch), "diverged": 1.0, **worst}
