"""The FLYP loss: hand-computed values, and data parallel equal to one big batch.

Both compare in float64, where rounding moves a value by about 1e-16 of its size: the hand
values are exact up to that, and two workers differ from one process only in the order they
add things up (float32 made that 1e-6 and more, next to tolerances of 1e-5).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from flyp_ray.finetune.loss import FlypLoss
from tests.support.numeric import default_dtype

SAME = 1e-12  # float64: rounding is ~1e-16 of a value; any real difference is >1e-4 of it
E = math.e
# Identity image and text features with logit scale 1: every matching pair scores 1, every
# other pair 0, so each row's softmax is e / (e + number of other columns).
HAND = {
    "negative": math.log(1 + 2 / E),
    # labels [0, 0, 1]: rows 0 and 1 drop their same-class neighbour from the denominator.
    "mask": (2 * math.log(1 + 1 / E) + math.log(1 + 2 / E)) / 3,
    # rows 0 and 1 target both class-0 columns with weight 1/2 each.
    "positive": math.log(E + 2) - 2 / 3,
}


@pytest.mark.parametrize("mode", sorted(HAND))
def test_hand_computed_3x3(mode: str) -> None:
    features = torch.eye(3, dtype=torch.float64)
    loss = FlypLoss(mode)(features, features, torch.tensor(1.0, dtype=torch.float64),
                          torch.tensor([0, 0, 1]))
    assert loss.item() == pytest.approx(HAND[mode], abs=SAME)


def test_negative_mode_is_open_clip_loss() -> None:
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    labels = torch.randint(0, 3, (8,))
    ours = FlypLoss("negative")(img, txt, torch.tensor(20.0), labels)
    assert ours.item() == pytest.approx(ClipLoss()(img, txt, torch.tensor(20.0)).item())


def test_modes_differ_when_classes_repeat() -> None:
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    values = {m: FlypLoss(m)(img, txt, torch.tensor(10.0), labels).item() for m in HAND}
    assert len({round(v, 6) for v in values.values()}) == 3


# --- data parallel == one process --------------------------------------------------------

GLOBAL_BATCH = 8
CASES = [(mode, False) for mode in ("negative", "mask", "positive")] + [("positive", True)]


def _batch(tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=gen).double()
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0])  # repeats within and across workers
    names = ["cat", "dog", "bird", "fish"]
    texts = tokenizer([f"a photo of a {names[int(y)]}." for y in labels])
    return images, texts, labels


def _gradients(model: torch.nn.Module, mode: str, local: bool, rank: int, world: int,
               wrapped: torch.nn.Module) -> dict[str, Any]:
    from open_clip import get_tokenizer

    images, texts, labels = _batch(get_tokenizer("flyp-tiny-vit"))
    share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    model.zero_grad(set_to_none=True)
    out = wrapped(images[share], texts[share])
    loss_fn = FlypLoss(mode, local_loss=local, rank=rank, world_size=world)
    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], labels[share])
    loss.backward()
    return {"loss": loss.detach(),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()
                      if p.grad is not None}}


def _tiny_model(arch: str) -> torch.nn.Module:
    from flyp_ray.config import ModelConfig
    from flyp_ray.finetune.model import load_model

    torch.manual_seed(0)
    with default_dtype():
        return load_model(ModelConfig(arch=arch, pretrained=None)).model


def _worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = _tiny_model(config["arch"])  # float64, as the one-process side
    wrapped = ray.train.torch.prepare_model(model)
    results = {f"{m}-{loc}": _gradients(model, m, loc, rank, world, wrapped)
               for m, loc in config["cases"]}
    torch.save(results, Path(config["out"]) / f"rank{rank}.pt")
    ray.train.report({"done": 1})


@pytest.mark.slow
def test_two_workers_match_one_process(ray_session: None, tiny_vit_arch: str,
                                       tmp_path: Path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _worker,
        train_loop_config={"arch": tiny_vit_arch, "cases": CASES, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="loss-ddp", storage_path=str(tmp_path / "ray")),
    )
    trainer.fit()
    model = _tiny_model(tiny_vit_arch)
    for rank in (0, 1):
        ddp = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for mode, local in CASES:
            single = _gradients(model, mode, False, 0, 1, model)
            got = ddp[f"{mode}-{local}"]
            name = f"{mode} local={local} rank {rank}"
            if not local:  # with local_loss each worker's loss is its own rows' share
                torch.testing.assert_close(got["loss"], single["loss"], atol=SAME, rtol=SAME)
            assert got["grads"].keys() == single["grads"].keys()
            gap = max(float((got["grads"][k] - g).abs().max()) for k, g in single["grads"].items())
            print(f"\n{name}: max gradient difference {gap:.3g}")
            for key, grad in single["grads"].items():
                assert grad.dtype == torch.float64
                torch.testing.assert_close(got["grads"][key], grad, atol=SAME, rtol=SAME,
                                           msg=f"{name}: {key}")
