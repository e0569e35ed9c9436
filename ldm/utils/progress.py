"""Progress of long work: a bar on a terminal, a log line every ``every_s`` seconds otherwise (log files, CI)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("ldm.progress")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """``with Progress(total, "latent cache train", "img") as p: ... p.update(n)``.

    On a terminal (stderr a tty) a tqdm bar; otherwise ``desc: done/total (pct), rate/s, ~left`` logged every
    ``every_s`` seconds and once at the end, so that a log file shows where the work is. ``enabled=False``:
    silent.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", every_s: float = 30.0, enabled: bool = True,
                 terminal: bool | None = None):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.enabled = enabled
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.done = 0
        self._start = self._last = time.monotonic()
        self._bar = tqdm(total=total, desc=desc, unit=unit, mininterval=1.0) if enabled and self.terminal else None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last >= self.every_s:
            self._log()

    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            remaining = self.total - self.done
            left = f", ~{_duration(remaining / rate)} left" if rate > 0 and remaining > 0 else ""
            return (f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%), "
                    f"{rate:.1f} {self.unit}/s, {_duration(elapsed)} elapsed{left}")
        return f"{self.desc}: {self.done:,} {self.unit}, {rate:.1f} {self.unit}/s, {_duration(elapsed)} elapsed"

    def _log(self) -> None:
        self._last = time.monotonic()
        log.info("%s", self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            self._log()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def track(items: Iterable, total: int | None, desc: str, unit: str = "it", **kwargs: Any) -> Iterator:
    """Iterate ``items`` under a :class:`Progress`."""
    with Progress(total, desc, unit, **kwargs) as progress:
        for item in items:
            yield item
            progress.update()
