"""Whether the pretrained weights a model spec names are here, or can be fetched, in seconds.

open_clip fetches a tag's weights (and an ``hf-hub:`` model's config and weights) on first use,
through huggingface_hub or from a URL. On a machine that cannot reach the hub that first use
fails only after about a minute of retries per file, in every trial of a search. So ``validate``
and each training worker first resolve the spec to the files open_clip will read, the way
open_clip does (``get_pretrained_cfg``, its preference for the hub, safetensors first), and look:

1. in the local cache (``huggingface_hub.try_to_load_from_cache``, which follows ``HF_HOME`` and
   ``HF_HUB_CACHE``; ``~/.cache/clip`` for URL weights, open_clip's default): a cached file is
   loaded by open_clip itself, as before;
2. else, unless ``HF_HUB_OFFLINE`` is set, with one request of a few seconds to the host.

Neither: a one-line ModelError that names the file looked for and the ways to provide it.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.error
import urllib.request
from pathlib import Path

from flyp_ray.errors import ModelError, first_line

HF_HUB = "hf-hub:"
REACH_TIMEOUT_S = 3.0
# open_clip's own default for URL weights (download_pretrained_from_url without cache_dir).
URL_CACHE = Path("~/.cache/clip")
HOW_TO_PROVIDE = ("give model.pretrained a checkpoint file, or pre-fill that cache (HF_HOME or "
                  "HF_HUB_CACHE) from a machine that has it and set HF_HUB_OFFLINE=1 where the "
                  "hub cannot be reached")


@dataclasses.dataclass(frozen=True)
class HubFile:
    """One file open_clip reads from a hub repo: the first of ``names`` that the repo has."""

    repo: str
    names: tuple[str, ...]


def locate(name: str, pretrained: str | None, source: str, key: str) -> str:
    """Where the weights of open_clip model ``name`` with ``pretrained`` come from, in words.

    ``name`` is an open_clip model name (or ``hf-hub:org/repo``), ``pretrained`` a tag, an
    ``hf-hub:`` id, a file or None. Raises a ModelError at ``key`` when they are neither cached
    nor reachable.
    """
    if pretrained is not None and pretrained.startswith(HF_HUB):
        name, pretrained = pretrained, None  # open_clip reads hub weights from the model name
    if name.startswith(HF_HUB):
        what = f"{source}: {key}: the weights of {name}"
        return _hub_files(_hub_model_files(name.removeprefix(HF_HUB)), what)
    if pretrained is None or Path(pretrained).expanduser().is_file():
        return "nothing to fetch"
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        return "nothing to fetch"  # not a tag: model.check_model names what it is
    if "file" in cfg:
        return f"file {cfg['file']}"
    what = f"{source}: {key}: the weights of {name} {pretrained!r}"
    hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    if hub and _has_hub():  # open_clip prefers the hub whenever huggingface_hub is installed
        repo, filename = os.path.split(hub)
        return _hub_files([HubFile(repo, _alternatives(filename or _weights_name()))], what)
    return _url_file(url, what)


def _has_hub() -> bool:
    from open_clip.pretrained import has_hf_hub

    return bool(has_hf_hub())


def _weights_name() -> str:
    from open_clip.constants import HF_WEIGHTS_NAME

    return str(HF_WEIGHTS_NAME)


def _alternatives(filename: str) -> tuple[str, ...]:
    """``filename`` after the safetensors files open_clip tries first for it."""
    # open_clip's own helpers (download_pretrained_from_hf): the same names in the same order.
    from open_clip.pretrained import _get_safe_alternatives, _has_safetensors

    safe = tuple(_get_safe_alternatives(filename)) if _has_safetensors else ()
    return (*safe, filename)


def _hub_model_files(repo: str) -> list[HubFile]:
    """An ``hf-hub:`` model: its open_clip config, then its default weights."""
    from open_clip.constants import HF_CONFIG_NAME

    return [HubFile(repo, (HF_CONFIG_NAME,)), HubFile(repo, _alternatives(_weights_name()))]


def _cached(file: HubFile) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in file.names:
        found = try_to_load_from_cache(file.repo, filename)
        if isinstance(found, str):
            return found
    return None


def _cache_path(file: HubFile) -> str:
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"models--{file.repo.replace('/', '--')}"
    return f"{folder}/snapshots/*/{' or '.join(file.names)}"


def _hub_files(files: list[HubFile], what: str) -> str:
    """Where ``files`` come from; ``what`` (file, key and spec) begins the error if nowhere."""
    from huggingface_hub import constants, is_offline_mode

    missing = [f for f in files if _cached(f) is None]
    if not missing:
        return f"cached: {_cached(files[-1])}"
    for file in missing:
        reason = "HF_HUB_OFFLINE is set" if is_offline_mode() else _hub_unreachable(file)
        if reason is not None:
            raise ModelError(f"{what} are neither cached nor reachable: looked for "
                             f"{_cache_path(file)} ({reason}); {HOW_TO_PROVIDE}")
    return f"not cached: fetched from {constants.ENDPOINT} at first use"


def _hub_unreachable(file: HubFile) -> str | None:
    """Why the hub cannot give ``file`` now, or None if it can (one short request per name)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError

    for filename in file.names:
        try:
            get_hf_file_metadata(hf_hub_url(file.repo, filename), timeout=REACH_TIMEOUT_S)
            return None
        except EntryNotFoundError:
            continue  # open_clip then tries the next name
        except Exception as err:  # noqa: BLE001 - connection, auth, server: the hub cannot give it
            return f"{constants.ENDPOINT} did not give it: {type(err).__name__}: {first_line(err)}"
    return f"{file.repo} has no {' or '.join(file.names)}"


def _url_file(url: str, what: str) -> str:
    path = URL_CACHE.expanduser() / os.path.basename(url)
    if path.is_file():
        return f"cached at {path}"
    try:
        request = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(request, timeout=REACH_TIMEOUT_S):  # noqa: S310 - open_clip's
            return f"not cached: fetched from {url} at first use"
    except (urllib.error.URLError, OSError) as err:
        reason = f"{url} did not answer: {first_line(err)}"
    raise ModelError(f"{what} are neither cached nor reachable: looked for {path} ({reason}); "
                     f"give model.pretrained a checkpoint file, or copy the file there from a "
                     f"machine that has it")
