"""Class names and prompt templates of every data set, in one place.

FLYP turns each class into text: a template such as ``"a photo of {}."`` filled with the class
name. Training draws prompts from these templates, and the zero-shot head averages the text
embeddings over all of them. The class lists (WILDS', and CLIP's for the transfer and few-shot
sets) are package data (``flyp_ray/data/classnames/``), one name per line in the data set's label
order, so that line ``i`` names label ``i``.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from flyp_ray.config import decode_utf8
from flyp_ray.errors import ConfigError

TEMPLATES: dict[str, tuple[str, ...]] = {
    # FLYP's and WiSE-FT's two iWildCam prompts, unchanged, so results compare with the paper.
    "iwildcam": ("a photo of {}.", "{} in the wild."),
    # FLYP's (and WiSE-FT's) 16 FMoW prompts. Two of them put "a" or "an" before the class
    # name, whichever fits it; a "{}" template cannot choose, so they go without (FIDELITY.md).
    "fmow": (
        "satellite photo of a {}.",
        "aerial photo of a {}.",
        "satellite photo of {}.",
        "aerial photo of {}.",
        "satellite photo of a {} in asia.",
        "aerial photo of a {} in asia.",
        "satellite photo of a {} in africa.",
        "aerial photo of a {} in africa.",
        "satellite photo of a {} in the americas.",
        "aerial photo of a {} in the americas.",
        "satellite photo of a {} in europe.",
        "aerial photo of a {} in europe.",
        "satellite photo of a {} in oceania.",
        "aerial photo of a {} in oceania.",
        "a photo of a {}.",
        "{}.",
    ),
    "camelyon17": (
        "this is a photo of {}",  # FLYP's PatchCamelyon prompt
        "a histopathology slide showing {}.",
        "histopathology image of {}.",
        "a microscope image of {}.",
    ),
    # The CLIP paper's per-data-set templates (openai/CLIP data/prompts.md), as FLYP uses them.
    "caltech101": (
        "a photo of a {}.",
        "a painting of a {}.",
        "a plastic {}.",
        "a sculpture of a {}.",
        "a sketch of a {}.",
        "a tattoo of a {}.",
        "a toy {}.",
        "a rendition of a {}.",
        "a embroidered {}.",
        "a cartoon {}.",
        "a {} in a video game.",
        "a plushie {}.",
        "a origami {}.",
        "art of a {}.",
        "graffiti of a {}.",
        "a drawing of a {}.",
        "a doodle of a {}.",
        "a photo of the {}.",
        "a painting of the {}.",
        "the plastic {}.",
        "a sculpture of the {}.",
        "a sketch of the {}.",
        "a tattoo of the {}.",
        "the toy {}.",
        "a rendition of the {}.",
        "the embroidered {}.",
        "the cartoon {}.",
        "the {} in a video game.",
        "the plushie {}.",
        "the origami {}.",
        "art of the {}.",
        "graffiti of the {}.",
        "a drawing of the {}.",
        "a doodle of the {}.",
    ),
    "stanford_cars": (
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of my {}.",
        "i love my {}!",
        "a photo of my dirty {}.",
        "a photo of my clean {}.",
        "a photo of my new {}.",
        "a photo of my old {}.",
    ),
    "flowers102": ("a photo of a {}, a type of flower.",),
    "pcam": ("this is a photo of {}",),
    "rendered_sst2": ("a {} review of a movie.",),
    # CLIP's 80 ImageNet prompts, as FLYP trains and evaluates ImageNet with them. open_clip
    # keeps them as functions of the class name; given "{}", each returns its template string.
    "imagenet": tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES),
    "simple": ("a photo of a {}.",),
    "synthetic": ("a photo of a {}.", "a drawing of a {}.", "a {} shape.", "a picture of a {}."),
}

# The template set used when the config names none.
DEFAULT_TEMPLATES: dict[str, str] = {
    "iwildcam": "iwildcam",
    "fmow": "fmow",
    "camelyon17": "camelyon17",
    "csv": "simple",
    "synthetic": "synthetic",
    "imagenet": "imagenet",
    "caltech101": "caltech101",
    "stanford_cars": "stanford_cars",
    "flowers102": "flowers102",
    "pcam": "pcam",
    "rendered_sst2": "rendered_sst2",
}

# Data sets whose class names ship with the package as flyp_ray/data/classnames/<name>.txt.
_PACKAGED_CLASSNAMES = (
    "iwildcam", "fmow", "camelyon17",
    "caltech101", "stanford_cars", "flowers102", "pcam", "rendered_sst2",  # CLIP's class names
)


def templates_for(spec: str | list[str] | None, dataset: str, source: str) -> list[str]:
    """The prompt templates for ``dataset``: its default set, a named set, or the user's list.

    Every template must contain ``{}`` (where the class name goes); anything else is a
    :class:`ConfigError` naming ``dataset.templates`` and the value.
    """
    if spec is None:
        return list(TEMPLATES[DEFAULT_TEMPLATES.get(dataset, "simple")])
    if isinstance(spec, str):
        if spec not in TEMPLATES:
            known = ", ".join(sorted(TEMPLATES))
            problem = f"unknown template set {spec!r} (known: {known})"
            raise ConfigError(source, "dataset.templates", problem)
        return list(TEMPLATES[spec])
    if not spec:
        raise ConfigError(source, "dataset.templates", "needs at least one template, got []")
    for i, template in enumerate(spec):
        _check_template(template, source, f"dataset.templates[{i}]")
    return list(spec)


def _check_template(template: object, source: str, key: str) -> None:
    if not isinstance(template, str) or "{}" not in template:
        problem = f"a template needs '{{}}' where the class name goes, got {template!r}"
        raise ConfigError(source, key, problem)
    try:
        # Other braces ("{0}", "{name}", a lone "{") would break str.format at training time.
        template.format("x")
    except (IndexError, KeyError, ValueError):
        problem = f"a template may hold no placeholder but '{{}}', got {template!r}"
        raise ConfigError(source, key, problem) from None


def builtin_classnames(dataset: str) -> list[str] | None:
    """The class names that ship with the package for ``dataset``; None for ``csv``."""
    if dataset in _PACKAGED_CLASSNAMES:
        resource = importlib.resources.files("flyp_ray.data").joinpath(f"classnames/{dataset}.txt")
        return _parse_names(resource.read_text("utf-8"))
    if dataset == "imagenet":
        return list(IMAGENET_CLASSNAMES)  # open_clip's, in the standard (sorted wnid) order
    if dataset == "synthetic":
        from flyp_ray.data.synthetic import CLASSNAMES

        return list(CLASSNAMES)
    return None


def classnames_for(
    dataset: str, file: str | None, num_classes: int | None, source: str
) -> list[str]:
    """The class names of ``dataset``, label ``i`` named by entry ``i``.

    A ``file`` (one name per line) overrides the built-in list and must then hold exactly
    ``num_classes`` names when that is known. Without a file, the built-in list is used; a WILDS
    folder with fewer classes (WILDS counts ``max(y) + 1``) gets its first ``num_classes`` names.
    """
    if file is not None:
        names = read_classnames(file, source)
        if num_classes is not None and len(names) != num_classes:
            problem = f"{file} has {len(names)} names but {dataset} has {num_classes} classes"
            raise ConfigError(source, "dataset.classnames", problem)
        return names
    builtin = builtin_classnames(dataset)
    if builtin is None:
        problem = f"is required for dataset {dataset} (a file, one class name a line), got None"
        raise ConfigError(source, "dataset.classnames", problem)
    if num_classes is None:
        return builtin
    if num_classes > len(builtin):
        problem = (f"the built-in {dataset} list has {len(builtin)} names but the data has "
                   f"{num_classes} classes; give a file with {num_classes} names")
        raise ConfigError(source, "dataset.classnames", problem)
    return builtin[:num_classes]


def read_classnames(file: str, source: str) -> list[str]:
    """Read a class-name file: one name per line, blank lines and surrounding spaces ignored."""
    path = Path(file).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(source, "dataset.classnames", f"file not found: {path}") from None
    except OSError as err:
        raise ConfigError(source, "dataset.classnames", f"cannot read {path} ({err})") from None
    names = _parse_names(decode_utf8(data, source, "dataset.classnames", str(path)))
    if not names:
        raise ConfigError(source, "dataset.classnames", f"{path} holds no class names")
    return names


def _parse_names(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]
