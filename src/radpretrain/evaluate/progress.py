"""Progress of ``evaluate`` on stderr.

One bar over the cells (init x protocol x fold x label fraction) with the elapsed time and an
estimate of what remains, inner bars for the steps that take long (reading the images, frozen
features, fine-tuning batches), and one log line per finished cell, so a run is never silent for
minutes.  Bars are ``tqdm`` with ``disable=None``: quiet without a terminal, where the log lines
(which carry the same estimate) remain.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from radpretrain.utils import get_logger

log = get_logger("evaluate")


def bar(total: int, desc: str, unit: str = "it", leave: bool = False, file=None) -> tqdm:
    """A tqdm bar on stderr (or ``file``), quiet when that is not a terminal."""
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=file if file is not None else sys.stderr,
                disable=None, dynamic_ncols=True, mininterval=0.5)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


class CellProgress:
    """The outer bar and the per-cell log lines of one ``evaluate`` run."""

    def __init__(self, total_cells: int, file=None):
        self.total = int(total_cells)
        self.done = 0
        self.file = file
        self.t0 = time.time()
        self.outer = bar(self.total, "evaluate", unit="cell", leave=True, file=file)

    def inner(self, total: int, desc: str, unit: str = "it") -> tqdm:
        """A bar for the steps inside one cell (closed by the caller; it does not stay on screen)."""
        return bar(total, desc, unit=unit, leave=False, file=self.file)

    def remaining(self) -> float | None:
        """Seconds left at the mean pace of the finished cells (None before the first)."""
        if self.done == 0:
            return None
        return (time.time() - self.t0) / self.done * (self.total - self.done)

    def finished(self, label: str, seconds: float, note: str = "") -> str:
        """Count one finished cell and log it; returns the logged line."""
        self.done += 1
        self.outer.update(1)
        left = self.remaining()
        line = (f"[{self.done}/{self.total}] {label}{': ' + note if note else ''} ({seconds:.1f} s; "
                f"elapsed {_duration(time.time() - self.t0)}"
                + (f", about {_duration(left)} left)" if left is not None and self.done < self.total else ")"))
        log.info(line)
        return line

    def close(self) -> None:
        self.outer.close()


@contextlib.contextmanager
def cell_progress(total_cells: int, file=None):
    """:class:`CellProgress` with the package's log lines written through tqdm (bars stay intact)."""
    p = CellProgress(total_cells, file=file)
    try:
        with logging_redirect_tqdm(loggers=[logging.getLogger("radpretrain")]):
            yield p
    finally:
        p.close()
