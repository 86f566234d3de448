"""Helpers the tests share: configs, servers, and data-set folders in the real layouts."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root: search_spaces/, bench/, ...
