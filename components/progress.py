"""Progress of long steps as log lines with an ETA (the CLI's console shows a stage's own log lines: flows.console).

`track` is tqdm (its rate and ETA) writing one log line at most every `every` seconds instead of redrawing a bar;
`ticking` logs the elapsed share of a fixed time budget (FLAML's search) from a background thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

EVERY_SECONDS = 15.0  # at most one progress line per this many seconds per step
BAR_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {elapsed} so far, ETA {remaining}"


class _LogLines:
    """A file-like tqdm writes to: each refreshed line becomes one log record."""

    def __init__(self, logger: logging.Logger):
        self.logger, self.last = logger, ""

    def write(self, text: str) -> None:
        line = text.strip("\r\n ")
        if line and line != self.last:
            self.logger.info("%s", line)
            self.last = line

    def flush(self) -> None:
        pass


def track(iterable: Iterable, total: int, what: str, logger: logging.Logger, unit: str = "images",
          every: float = EVERY_SECONDS) -> Iterator:
    """Iterate `iterable`, logging `what: n/total unit (p%), elapsed, ETA` at most every `every` seconds (and at
    the end)."""
    return iter(tqdm(iterable, total=total, desc=what, unit=unit, file=_LogLines(logger), mininterval=every,
                     maxinterval=max(every, 10 * every), bar_format=BAR_FORMAT, disable=False, dynamic_ncols=False,
                     ascii=True))


@contextmanager
def ticking(what: str, budget_seconds: float, logger: logging.Logger, every: float = EVERY_SECONDS):
    """Log `what: N of budget s` every `every` seconds while the block runs."""
    done = threading.Event()
    start = time.perf_counter()

    def tick():
        while not done.wait(every):
            elapsed = time.perf_counter() - start
            logger.info("%s: %.0f of %.0f s, about %.0f s left", what, elapsed, budget_seconds,
                        max(budget_seconds - elapsed, 0))

    thread = threading.Thread(target=tick, daemon=True, name=f"progress: {what}")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
