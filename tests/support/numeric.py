"""Equivalence tests in float64: rounding noise far below any tolerance a real difference meets.

In float32 the order in which a sum is reduced (one process against two, another CPU's kernels)
moves results by up to ~1e-5; in float64 by ~1e-15, so a tolerance such as 1e-9 stays many orders
of magnitude from both the noise and any real difference (a wrong beta, eps or clamp: 1e-4 and
more).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype = torch.float64) -> Iterator[None]:
    """Models built (and stepped) inside take ``dtype``: open_clip makes its parameters and
    buffers in torch's default dtype, and float32 checkpoint values load into them exactly."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)
