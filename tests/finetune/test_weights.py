"""Pretrained weights: found in the local cache and loaded by open_clip's own path, or refused
with one line in seconds, by validate and by a training worker alike.

Nothing is downloaded. The cached cases write a tiny open_clip model into a temporary Hugging
Face cache, at the path huggingface_hub reads; the refused ones point the hub at an address
that takes no connection (``HF_ENDPOINT``), so they hold on a machine with internet too. The
hub's variables are read when huggingface_hub is imported: those tests run in a process of
their own, the others set the cache folder the way the variable would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from flyp_ray.config import ModelConfig
from flyp_ray.finetune import weights
from flyp_ray.finetune.model import check_model, load_model, tiny_config_path
from tests.support import REPO
from tests.support.servers import free_port

REPO_ID = "flyp-test/tiny-clip"
REVISION = "0" * 40
VIT_B_16_HUB = "models--timm--vit_base_patch16_clip_224.openai"


def snapshot(cache: Path, repo: str) -> Path:
    """The snapshot folder huggingface_hub reads for ``repo`` at ``main``, made."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(REVISION)
    (folder / "snapshots" / REVISION).mkdir(parents=True, exist_ok=True)
    return folder / "snapshots" / REVISION


def write_hub_model(cache: Path) -> dict[str, torch.Tensor]:
    """An ``hf-hub:`` model as the hub serves it to open_clip: its config and safetensors."""
    files = snapshot(cache, REPO_ID)
    model_cfg = json.loads(tiny_config_path().read_text())
    (files / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                             "preprocess_cfg": {}}))
    open_clip.add_model_config(tiny_config_path())
    torch.manual_seed(7)
    model = open_clip.create_model("flyp-tiny")
    with torch.no_grad():
        model.logit_scale.fill_(1.234)  # type: ignore[operator]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(files / "open_clip_model.safetensors"))
    return state


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, used as HF_HUB_CACHE would make it be."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_cached_hub_model_is_accepted_and_loaded_from_the_cache(hub_cache: Path) -> None:
    state = write_hub_model(hub_cache)
    spec = ModelConfig(arch=f"hf-hub:{REPO_ID}", pretrained=None)
    weights_file = snapshot(hub_cache, REPO_ID) / "open_clip_model.safetensors"
    assert check_model(spec, "c.yaml") == (f"model hf-hub:{REPO_ID} with weights from the hub "
                                           f"(cached: {weights_file})")
    loaded = load_model(spec, "c.yaml")  # open_clip's hub path, reading the cache
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[name]), name
    as_pretrained = ModelConfig(arch=str(tiny_config_path()), pretrained=f"hf-hub:{REPO_ID}")
    assert check_model(as_pretrained, "c.yaml").endswith(f"(cached: {weights_file})")


def test_a_tag_is_looked_for_where_open_clip_reads_it(hub_cache: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # ViT-B-16's 'openai' weights come from a hub repo; a file there stands in for them.
    weights_file = snapshot(hub_cache, "timm/vit_base_patch16_clip_224.openai") / \
        "open_clip_model.safetensors"
    weights_file.write_bytes(b"not built here")
    found = weights.locate("ViT-B-16", "openai", "c.yaml", "model.pretrained")
    assert found == f"cached: {weights_file}"
    # open_clip's own resolution of the tag (what create_model downloads, or finds) agrees.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = open_clip.get_pretrained_cfg("ViT-B-16", "openai")
    assert open_clip.pretrained.download_pretrained(cfg) == str(weights_file)


# Run in a process of its own with the hub's variables set: check_model (what validate runs),
# then load_model (what each training worker runs); print each one's error line and seconds.
CHECK_AND_LOAD = """
import json, sys, time
from flyp_ray.config import ModelConfig
from flyp_ray.errors import ModelError
from flyp_ray.finetune.model import check_model, load_model
spec = ModelConfig(arch=sys.argv[1], pretrained=sys.argv[2] if sys.argv[2] != "null" else None)
out = []
for step in (check_model, load_model):
    start = time.monotonic()
    try:
        step(spec, "c.yaml")
        out.append(["accepted", time.monotonic() - start])
    except ModelError as err:
        out.append([str(err), time.monotonic() - start])
print(json.dumps(out))
"""


def check_and_load(tmp: Path, arch: str, pretrained: str, **env: str) -> list[str]:
    cache = tmp / "empty-hub"
    cache.mkdir(exist_ok=True)
    full = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_HOME")}
    full.update(PYTHONPATH=str(REPO), HF_HUB_CACHE=str(cache), **env)
    done = subprocess.run([sys.executable, "-c", CHECK_AND_LOAD, arch, pretrained], text=True,
                          capture_output=True, env=full, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    print("seconds (check, load):", [round(seconds, 2) for _, seconds in results])
    return [line for line, _ in results]


def test_a_tag_neither_cached_nor_reachable_is_refused_by_validate_and_the_worker(
        tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    lines = check_and_load(tmp_path, "ViT-B-16", "openai", HF_ENDPOINT=endpoint)
    cache = tmp_path / "empty-hub" / VIT_B_16_HUB
    assert lines[0] == lines[1]  # the worker stops with validate's line, before building
    assert lines[0].startswith(
        f"c.yaml: model.pretrained: the weights of ViT-B-16 'openai' are neither cached nor "
        f"reachable: looked for {cache}/snapshots/*/open_clip_model.safetensors or "
        f"open_clip_pytorch_model.bin ({endpoint} did not give it: ConnectError: "), lines[0]
    assert lines[0].endswith("give model.pretrained a checkpoint file, or pre-fill that cache "
                             "(HF_HOME or HF_HUB_CACHE) from a machine that has it and set "
                             "HF_HUB_OFFLINE=1 where the hub cannot be reached")


def test_offline_refuses_at_once_without_asking_the_hub(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as hub:
        hub.setblocking(False)
        endpoint = f"http://127.0.0.1:{hub.getsockname()[1]}"
        lines = check_and_load(tmp_path, f"hf-hub:{REPO_ID}", "null", HF_ENDPOINT=endpoint,
                               HF_HUB_OFFLINE="1")
        with pytest.raises(BlockingIOError):
            hub.accept()  # nobody knocked
    assert lines[0] == lines[1]
    cache = tmp_path / "empty-hub" / "models--flyp-test--tiny-clip"
    assert lines[0].startswith(f"c.yaml: model.arch: the weights of hf-hub:{REPO_ID} are "
                               f"neither cached nor reachable: looked for {cache}/snapshots/*/"
                               f"open_clip_config.json (HF_HUB_OFFLINE is set); "), lines[0]

