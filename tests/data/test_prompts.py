"""Tests of flyp_ray.data.prompts: template sets, built-in class names and user overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from wilds.datasets.fmow_dataset import categories as fmow_categories

from flyp_ray.data import synthetic
from flyp_ray.data.prompts import TEMPLATES, builtin_classnames, classnames_for, templates_for
from flyp_ray.errors import ConfigError

SRC = "cfg.yaml"


# --- templates -----------------------------------------------------------------------------


def test_iwildcam_templates_are_flyps_two() -> None:
    assert templates_for(None, "iwildcam", SRC) == ["a photo of {}.", "{} in the wild."]
    assert templates_for("iwildcam", "csv", SRC) == ["a photo of {}.", "{} in the wild."]


@pytest.mark.parametrize("dataset,expected", [
    ("fmow", "fmow"), ("camelyon17", "camelyon17"), ("csv", "simple"), ("synthetic", "synthetic"),
])
def test_default_template_set_per_data_set(dataset: str, expected: str) -> None:
    assert templates_for(None, dataset, SRC) == list(TEMPLATES[expected])


def test_every_builtin_template_formats_with_one_name() -> None:
    for name, templates in TEMPLATES.items():
        assert templates, name
        for template in templates:
            assert template.count("{}") == 1, (name, template)
            assert "zebra" in template.format("zebra")


def test_fmow_templates_speak_of_satellite_or_aerial_photos() -> None:
    templates = templates_for("fmow", "fmow", SRC)
    assert "satellite photo of a {}." in templates
    assert "aerial photo of a {}." in templates
    assert sum("satellite" in t or "aerial" in t for t in templates) >= 5


def test_user_list_of_templates_is_kept_in_order() -> None:
    mine = ["{} seen from above.", "a {}."]
    assert templates_for(mine, "fmow", SRC) == mine


def test_returned_list_is_a_copy() -> None:
    templates_for("simple", "csv", SRC).append("changed {}")
    assert templates_for("simple", "csv", SRC) == ["a photo of a {}."]


def test_unknown_template_set_names_key_and_value() -> None:
    with pytest.raises(ConfigError) as info:
        templates_for("satelite", "fmow", SRC)
    message = str(info.value)
    assert "cfg.yaml" in message and "dataset.templates" in message and "'satelite'" in message
    assert "fmow" in message  # the known sets are listed
    assert "\n" not in message


def test_template_without_placeholder_is_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        templates_for(["a photo of {}.", "a photo."], "csv", SRC)
    assert "dataset.templates[1]" in str(info.value)
    assert "'a photo.'" in str(info.value)


@pytest.mark.parametrize("bad", ["a {0} photo {}", "a {name} of {}", "{} {"])
def test_template_with_other_braces_is_rejected(bad: str) -> None:
    with pytest.raises(ConfigError, match="dataset.templates"):
        templates_for([bad], "csv", SRC)


def test_empty_template_list_is_rejected() -> None:
    with pytest.raises(ConfigError, match="dataset.templates"):
        templates_for([], "csv", SRC)


# --- built-in class names ------------------------------------------------------------------


def test_iwildcam_has_all_182_names_in_label_order() -> None:
    names = classnames_for("iwildcam", None, None, SRC)
    assert len(names) == 182
    assert names[0] == "empty"
    assert names[1] == "White-lipped peccary"
    assert names[52] == "Günther's dik-dik"
    assert names[81] == "Dog"
    assert names[181] == "central American red brocket"
    assert all(name and name == name.strip() for name in names)


def test_iwildcam_full_count_matches_wilds() -> None:
    assert classnames_for("iwildcam", None, 182, SRC) == classnames_for("iwildcam", None, None, SRC)


def test_fmow_names_follow_wilds_category_order() -> None:
    names = classnames_for("fmow", None, 62, SRC)
    assert names == [c.replace("_", " ") for c in fmow_categories]
    assert names[:2] == ["airport", "airport hangar"]


def test_camelyon17_has_two_classes() -> None:
    names = classnames_for("camelyon17", None, 2, SRC)
    assert names[0] == "lymph node"
    assert "tumor" in names[1]


def test_synthetic_names_are_the_generators_shapes() -> None:
    assert classnames_for("synthetic", None, None, SRC) == list(synthetic.CLASSNAMES)


def test_csv_has_no_builtin_names() -> None:
    assert builtin_classnames("csv") is None
    with pytest.raises(ConfigError) as info:
        classnames_for("csv", None, None, SRC)
    assert "dataset.classnames" in str(info.value) and "csv" in str(info.value)


def test_a_wilds_folder_with_fewer_classes_gets_the_first_names() -> None:
    # WILDS counts iWildCam's classes as max(y) + 1, so a partial folder names its labels 0..n-1.
    first_four = classnames_for("iwildcam", None, None, SRC)[:4]
    assert classnames_for("iwildcam", None, 4, SRC) == first_four


def test_more_classes_than_builtin_names_is_an_error() -> None:
    with pytest.raises(ConfigError, match="dataset.classnames.*2.*5"):
        classnames_for("camelyon17", None, 5, SRC)


# --- user class-name files -----------------------------------------------------------------


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_user_file_overrides_builtin_names(tmp_path: Path) -> None:
    file = _write(tmp_path / "names.txt", "healthy tissue\n\n  tumour tissue  \n")
    assert classnames_for("camelyon17", file, 2, SRC) == ["healthy tissue", "tumour tissue"]


def test_user_file_for_csv_needs_no_count(tmp_path: Path) -> None:
    file = _write(tmp_path / "names.txt", "cat\ndog\nbird\n")
    assert classnames_for("csv", file, None, SRC) == ["cat", "dog", "bird"]


def test_user_file_with_wrong_count_names_path_and_both_counts(tmp_path: Path) -> None:
    file = _write(tmp_path / "names.txt", "a\nb\nc\n")
    with pytest.raises(ConfigError) as info:
        classnames_for("iwildcam", file, 182, SRC)
    message = str(info.value)
    assert "dataset.classnames" in message and file in message
    assert "3" in message and "182" in message
    assert "\n" not in message


def test_missing_user_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dataset.classnames.*not found"):
        classnames_for("csv", str(tmp_path / "nope.txt"), None, SRC)


def test_empty_user_file_is_a_config_error(tmp_path: Path) -> None:
    file = _write(tmp_path / "names.txt", "\n \n")
    with pytest.raises(ConfigError, match="no class names"):
        classnames_for("csv", file, None, SRC)
