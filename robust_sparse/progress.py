"""Progress on long work: a tqdm bar on a terminal, a plain log line every few seconds anywhere else.

A sweep's child processes, Slurm jobs and CI write to files, where a bar is either invisible (tqdm disables
itself) or a wall of carriage returns; there the same loop logs ``desc: 40/118 batches (34%), 12.3 s, ETA 23.8 s``
at most every :data:`LOG_EVERY_SECONDS`, through ``logging`` like every other line of a run.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

log = logging.getLogger("robust_sparse.progress")

#: Seconds between two log lines; ``ROBUST_SPARSE_PROGRESS_SECONDS`` overrides it (a sweep's runs inherit it).
LOG_EVERY_SECONDS = float(os.environ.get("ROBUST_SPARSE_PROGRESS_SECONDS", 30.0))


class LogProgress:
    """The part of tqdm's interface the toolkit uses (iterate, ``update``, ``set_postfix``, context manager),
    reported as periodic log lines."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 initial: int = 0, every_seconds: float | None = None) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every_seconds = LOG_EVERY_SECONDS if every_seconds is None else every_seconds
        self.started = self.last = time.monotonic()
        self.postfix = ""
        self.initial = initial

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_seconds:
            self.last = now
            log.info("%s", self.line(now))

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def line(self, now: float | None = None) -> str:
        elapsed = (now if now is not None else time.monotonic()) - self.started
        done = self.n - self.initial
        text = f"{self.desc}: {self.n}"
        if self.total:
            text += f"/{self.total} {self.unit} ({self.n / self.total:.0%})"
        else:
            text += f" {self.unit}"
        text += f", {elapsed:.1f} s"
        if self.total and done > 0:
            text += f", ETA {elapsed / done * (self.total - self.n):.1f} s"
        return text + (f" [{self.postfix}]" if self.postfix else "")

    def close(self) -> None:
        pass

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(iterable: Iterable | None = None, *, enabled: bool, desc: str, total: int | None = None,
             unit: str = "it", initial: int = 0):
    """A tqdm bar when ``enabled`` and stderr is a terminal, periodic log lines when ``enabled`` and it is not,
    a silent tqdm otherwise."""
    if enabled and not sys.stderr.isatty():
        return LogProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=False, disable=not enabled,
                dynamic_ncols=True)
