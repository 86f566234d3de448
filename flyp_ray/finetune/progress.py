"""Progress inside an epoch: samples/s, step time, and the share of time spent waiting for data.

A long epoch must not be silent, and a GPU that waits for its loader must show it at once. A
:class:`Meter` times one epoch's steps: the time the loop blocked on the loader for the next
batch (the data path's share) against the whole time (the step's). The loop reads it where it
synchronises with the device anyway, every ``train.log_every_steps`` steps and at the end of the
epoch, so the figures are device time and measuring adds no sync of its own. With the
decode-once cache (``dataset.cache``) it also counts the training images decoded meanwhile: the
first epoch fills the cache, later ones (and later trials on the node) should decode none.

A terminal gets fewer of these lines than MLflow gets readings (:class:`Pace`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

# A worker's progress lines at INFO: the first, then at most one a minute. Several trials at a
# time, each with epochs of seconds (the demo), would otherwise scroll a line every second.
TERMINAL_EVERY_S = 60.0


@dataclasses.dataclass
class Window:
    """Steps counted since ``started`` (a ``time.perf_counter`` reading)."""

    started: float = dataclasses.field(default_factory=time.perf_counter)
    steps: int = 0
    samples: int = 0  # this worker's
    waited: float = 0.0  # seconds blocked on the loader

    def figures(self, now: float, world_size: int) -> dict[str, float]:
        """``samples_per_s`` (all workers), ``step_ms`` and ``data_wait`` (a fraction)."""
        elapsed = max(now - self.started, 1e-9)
        return {"samples_per_s": self.samples * world_size / elapsed,
                "step_ms": 1000.0 * elapsed / max(self.steps, 1),
                "data_wait": min(1.0, self.waited / elapsed)}


class Meter:
    """The current window (since the last reading) and the whole epoch, counted together."""

    def __init__(self, world_size: int, filled: Callable[[], int] | None = None) -> None:
        self.world_size = world_size
        self.window = Window()
        self.epoch = Window(started=self.window.started)
        self.filled = filled  # the training cache's filled items, if the split is cached
        self.filled_at = self.epoch_filled_at = filled() if filled is not None else 0

    def step(self, samples: int, waited: float) -> None:
        """One optimizer step on ``samples`` images, after ``waited`` seconds for the batch."""
        for w in (self.window, self.epoch):
            w.steps += 1
            w.samples += samples
            w.waited += waited

    def reading(self) -> dict[str, float]:
        """The window's figures (and ``decoded``, with a cache); a new window starts now."""
        now = time.perf_counter()
        figures = self.window.figures(now, self.world_size)
        self.window = Window(started=now)
        if self.filled is not None:
            filled = self.filled()
            figures["decoded"], self.filled_at = filled - self.filled_at, filled
        return figures

    def epoch_figures(self) -> dict[str, float]:
        """The figures of the epoch so far, and its ``seconds``."""
        now = time.perf_counter()
        figures = {**self.epoch.figures(now, self.world_size), "seconds": now - self.epoch.started}
        if self.filled is not None:
            figures["decoded"] = self.filled() - self.epoch_filled_at
        return figures


def line(figures: dict[str, float]) -> str:
    """``3150 samples/s, 81.2 ms/step, data wait 2%[, decoded 512]``, as a log line reads them.

    ``decoded`` counts images of the cached training split decoded by any process of the node.
    """
    text = (f"{figures['samples_per_s']:.0f} samples/s, {figures['step_ms']:.1f} ms/step, "
            f"data wait {100 * figures['data_wait']:.0f}%")
    return text + (f", decoded {figures['decoded']:.0f}" if "decoded" in figures else "")


class Pace:
    """The level of each progress line: INFO for the first and then one a minute, DEBUG between.

    A command shows INFO; ``--verbose`` shows DEBUG too. MLflow gets every reading either way.
    """

    def __init__(self, every_s: float = TERMINAL_EVERY_S) -> None:
        self.every_s = every_s
        self.last: float | None = None  # time.monotonic() of the last INFO line

    def level(self) -> int:
        """INFO if a minute has passed since the last INFO line (or there was none), else DEBUG."""
        now = time.monotonic()
        if self.last is not None and now - self.last < self.every_s:
            return logging.DEBUG
        self.last = now
        return logging.INFO
