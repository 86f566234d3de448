"""WiSE-FT (Wortsman et al. 2022): evaluate mixes of the zero-shot and the finetuned weights.

``theta(alpha) = (1 - alpha) * theta_zero_shot + alpha * theta_finetuned``, for every weight of
the model that evaluation uses: both CLIP towers for FLYP (the head is rebuilt from the mixed
text tower), the image tower and the head for the cross-entropy baselines. Alpha 0 is the
zero-shot model and alpha 1 the finetuned one, exactly: ``1 * a + 0 * b == a`` in floating point.
The finetuned end is the epoch best on ``id_val/acc`` (the one FLYP selects), and the sweep runs
once, after the last epoch. Metrics are ``wiseft/{alpha}/{split}/{metric}``; the alpha best on
``id_val`` is reported again as ``wiseft/best/...`` with ``wiseft/best/alpha``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

SELECT = "id_val/acc"  # WiSE-FT's alpha is chosen on ID validation data, like everything else

State = dict[str, torch.Tensor]


def snapshot(model: torch.nn.Module) -> State:
    """A CPU copy of ``model``'s weights and buffers."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def mix(zero_shot: State, finetuned: State, alpha: float) -> State:
    """The weight-space interpolation; integer buffers (BatchNorm's counters) come from
    ``finetuned``."""
    return {k: ((1 - alpha) * zero_shot[k] + alpha * v) if v.is_floating_point() else v
            for k, v in finetuned.items()}


def name(alpha: float) -> str:
    """The alpha as it appears in metric names: 0.0, 0.5, 1.0."""
    return repr(round(float(alpha), 6))


@dataclasses.dataclass
class Best:
    """The weights of the epoch best on ``id_val/acc`` so far (None: the current ones)."""

    state: State | None = None
    score: float = -math.inf
    epoch: int = 0

    def update(self, model: torch.nn.Module, metrics: dict[str, float], epoch: int) -> None:
        """Keep ``model``'s weights if ``metrics`` are at least as good as the best so far: the
        last of equals, as Ray Train keeps the last of equally scored checkpoints."""
        score = metrics.get(SELECT)
        if score is not None and score >= self.score:
            self.state, self.score, self.epoch = snapshot(model), score, epoch

    def meta(self) -> dict[str, float]:
        """What a checkpoint records of it, so that a resumed run finds these weights again."""
        return {"epoch": self.epoch, "score": self.score}


def evaluate_alphas(model: torch.nn.Module, zero_shot: State, finetuned: State | None,
                    alphas: Sequence[float],
                    evaluate: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``evaluate()`` at each mix of ``zero_shot`` and ``finetuned`` (None: ``model``'s own
    weights) loaded into ``model``, which holds its own weights again afterwards."""
    current = snapshot(model)
    finetuned = current if finetuned is None else finetuned
    out: dict[str, float] = {}
    try:
        for alpha in alphas:
            model.load_state_dict(mix(zero_shot, finetuned, alpha))
            out.update({f"wiseft/{name(alpha)}/{k}": v for k, v in evaluate().items()})
    finally:
        model.load_state_dict(current)
    return {**out, **best(out, alphas)}


def with_sweep(selected: dict[str, Any], final: dict[str, Any]) -> dict[str, Any]:
    """The selected epoch's metrics with the WiSE-FT sweep of the final epoch (which mixes
    towards the selected epoch's weights; earlier epochs report no sweep)."""
    if not any(k.startswith("wiseft/") and not k.startswith("wiseft/best/") for k in final):
        return selected
    return {**selected, **{k: v for k, v in final.items() if k.startswith("wiseft/")}}


def best(metrics: dict[str, float], alphas: Sequence[float]) -> dict[str, float]:
    """``wiseft/best/...``: the metrics of the alpha with the best ``id_val/acc``."""
    scored = [a for a in alphas if f"wiseft/{name(a)}/{SELECT}" in metrics]
    if not scored:
        return {}
    # Ties go to the larger alpha: the finetuned end, which is what the run was for.
    alpha = max(scored, key=lambda a: (metrics[f"wiseft/{name(a)}/{SELECT}"], a))
    prefix = f"wiseft/{name(alpha)}/"
    chosen = {f"wiseft/best/{k.removeprefix(prefix)}": v for k, v in metrics.items()
              if k.startswith(prefix)}
    return {**chosen, "wiseft/best/alpha": float(alpha)}
