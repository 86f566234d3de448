"""The tiny model's caption pre-training: a loadable checkpoint, cached, with zero-shot ability."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flyp_ray.config import DatasetConfig, ModelConfig
from flyp_ray.data import synthetic
from flyp_ray.data.load import load_data
from flyp_ray.finetune import pretrain
from flyp_ray.finetune.evaluate import evaluate_splits, zero_shot_head
from flyp_ray.finetune.model import load_model, tiny_config_path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private XDG cache, so that tests neither read nor fill the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "flyp-ray"


def load_pretrained(path: Path) -> torch.nn.Module:
    """The tiny model loaded through open_clip from the checkpoint file, as a config would."""
    return load_model(ModelConfig(arch=str(tiny_config_path()), pretrained=str(path))).model


def test_short_pretrain_writes_a_checkpoint_open_clip_loads(tmp_path: Path) -> None:
    out = pretrain.pretrain_tiny(tmp_path / "tiny.pt", steps=3)
    assert out == tmp_path / "tiny.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pt"]  # no temporary file left
    saved = torch.load(out, map_location="cpu", weights_only=True)
    loaded = load_pretrained(out).state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    fresh = load_model(ModelConfig(arch=str(tiny_config_path()), pretrained=None)).model
    # The weights moved away from any random initialisation: training happened.
    assert not torch.equal(fresh.state_dict()["text_projection"], saved["text_projection"])


def test_cached_checkpoint_is_reused_without_training(cache: Path) -> None:
    first = pretrain.pretrain_tiny(steps=2, seed=3)
    assert first.parent == cache and first == pretrain.cache_path(2, 3)
    stamp = first.stat().st_mtime_ns
    again = pretrain.pretrain_tiny(steps=2, seed=3)
    assert again == first
    assert again.stat().st_mtime_ns == stamp
    assert [p.name for p in cache.iterdir()] == [first.name]


def test_cache_key_changes_with_steps_and_seed(cache: Path) -> None:
    paths = {pretrain.cache_path(2, 0), pretrain.cache_path(3, 0), pretrain.cache_path(2, 1)}
    assert len(paths) == 3
    assert all(p.parent == cache for p in paths)
    assert pretrain.cache_path(2, 0) == pretrain.cache_path(2, 0)


def test_caption_pool_never_reuses_the_data_sets_images() -> None:
    for split in ("train", "ood_val"):  # the two sources of the pool
        pool = {synthetic.draw(split, i, pretrain.POOL_SEED) for i in range(200)}
        data = {synthetic.draw(split, i) for i in range(synthetic.SPLIT_SIZES[split])}
        assert len(pool) == 200 and not pool & data


def test_captions_name_the_shape_but_are_no_class_prompt() -> None:
    shape = synthetic.CLASSNAMES[synthetic.draw("train", 0, pretrain.POOL_SEED).label]
    texts = pretrain.captions("train", 0, pretrain.POOL_SEED)
    assert texts[0] == synthetic.caption("train", 0, pretrain.POOL_SEED)
    assert all(shape in t and t != f"a {shape}" for t in texts)


def test_bad_steps_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="steps"):
        pretrain.pretrain_tiny(tmp_path / "x.pt", steps=0)


@pytest.mark.slow
def test_default_pretraining_gives_zero_shot_above_chance(cache: Path) -> None:
    """The demo's start: the default recipe, evaluated with the class prompts it never saw."""
    loaded = load_model(ModelConfig(arch=str(tiny_config_path()),
                                    pretrained=str(pretrain.pretrain_tiny())))
    data = load_data(DatasetConfig(name="synthetic"), loaded.preprocess_train,
                     loaded.preprocess_eval, "test")
    device = torch.device("cpu")
    head = zero_shot_head(loaded.model, loaded.tokenizer, data.classnames, data.templates, device)
    metrics = evaluate_splits(loaded.model, head, [data.splits["id_val"]], batch_size=300,
                              device=device, precision="fp32")
    chance = 1 / len(synthetic.CLASSNAMES)
    assert metrics["id_val/acc"] >= 2 * chance
