"""Progress on long work: a tqdm bar on a terminal, a plain log line every few seconds anywhere else.

A sweep's child processes, Slurm jobs and CI write to files, where a bar is either invisible (tqdm disables
itself) or a wall of carriage returns; there the same loop logs ``desc: 40/118 batches (34%), 12.3 s, ETA 23.8 s``
at most every :data:`LOG_EVERY_SECONDS`, through ``logging`` like every other line of a run.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
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


class Heartbeat:
    """A log line every few seconds, from a background thread, while one unit of work that cannot report its
    own progress runs (an AutoAttack batch: its partition into batches fixes its per-point results, so it is
    not split for the sake of a bar). The line says what runs, on how many points, for how long, and the ETA
    of the whole task from the cost per point measured on its earlier batches.

    ``seconds_per_point`` is that measurement (None before any batch has finished); ``points_after`` the points
    still waiting after this batch; ``estimated_seconds_per_point`` an estimate to use until a batch has
    finished (the attack's pass budget times a pass of the model, measured: the line says it is an estimate).
    """

    def __init__(self, what: str, points: int, *, points_after: int = 0, seconds_per_point: float | None = None,
                 every_seconds: float | None = None, enabled: bool = True,
                 estimated_seconds_per_point: float | None = None) -> None:
        self.what, self.points, self.points_after = what, points, points_after
        self.seconds_per_point = seconds_per_point
        self.estimated_seconds_per_point = estimated_seconds_per_point
        self.every_seconds = LOG_EVERY_SECONDS if every_seconds is None else every_seconds
        self.enabled = enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = time.monotonic()

    def line(self, now: float | None = None) -> str:
        elapsed = (now if now is not None else time.monotonic()) - self.started
        text = f"{self.what}: running on {self.points} points, {elapsed:.0f} s so far"
        if self.seconds_per_point is None and self.estimated_seconds_per_point is not None:
            total = (self.points + self.points_after) * self.estimated_seconds_per_point
            if elapsed <= total:
                return text + (f", ETA ~{total - elapsed:.0f} s (an estimate from the attack's budget and the model's "
                               "measured cost per pass; refined once a batch has finished)")
            return text + (f"; over the estimated {total:.0f} s (an estimate from the attack's budget), so no ETA "
                           "until a batch has finished")
        if self.seconds_per_point is None:
            return text + "; ETA once a first batch has finished"
        remaining = max(0.0, (self.points + self.points_after) * self.seconds_per_point - elapsed)
        return text + (f", ETA {remaining:.0f} s ({self.seconds_per_point:.3g} s per point measured, "
                       f"{self.points + self.points_after} points to go)")

    def _beat(self) -> None:
        while not self._stop.wait(self.every_seconds):
            log.info("%s", self.line())

    def __enter__(self) -> "Heartbeat":
        self.started = time.monotonic()
        if self.enabled and self.every_seconds > 0:
            self._thread = threading.Thread(target=self._beat, name="robust-sparse-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
