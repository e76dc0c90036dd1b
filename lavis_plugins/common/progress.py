"""Progress bars that stay readable in log files.

On a terminal: tqdm, redrawn at most twice a second and left on screen when done (the last
state of an epoch stays visible). When stderr is not a terminal (a log file, a batch job,
``nohup``): plain lines, one every ``interval`` seconds and one at the end, instead of tqdm's
carriage-return redraws, which fill a log file with one long line of ``\\r`` frames.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO, TypeVar

T = TypeVar("T")

# seconds between lines when not on a terminal (override: LAVIS_PLUGINS_PROGRESS_INTERVAL)
DEFAULT_INTERVAL = 30.0


class LineProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` written as whole lines."""

    def __init__(self, total: Optional[int], desc: str, initial: int = 0,
                 interval: Optional[float] = None, stream: Optional[TextIO] = None,
                 unit: str = "it") -> None:
        self.total, self.desc, self.n, self.unit = total, desc, initial, unit
        self.interval = float(os.environ.get("LAVIS_PLUGINS_PROGRESS_INTERVAL", DEFAULT_INTERVAL)
                              if interval is None else interval)
        self.stream = stream or sys.stderr
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self._closed = False

    def _line(self) -> str:
        elapsed = time.monotonic() - self._start
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        return (f"{self.desc}: {done} {self.unit}{pct}, {elapsed:.0f}s"
                + (f", {self.postfix}" if self.postfix else ""))

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            print(self._line(), file=self.stream, flush=True)

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            print(self._line(), file=self.stream, flush=True)


def progress(total: Optional[int], desc: str, initial: int = 0, unit: str = "it",
             stream: Optional[TextIO] = None):
    """A tqdm bar on a terminal, else a :class:`LineProgress` (see the module docstring)."""
    stream = stream or sys.stderr
    if stream.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, mininterval=0.5,
                    leave=True, dynamic_ncols=True, file=stream)
    return LineProgress(total, desc, initial=initial, unit=unit, stream=stream)


def track(items: Iterable[T], total: Optional[int], desc: str, unit: str = "it") -> Iterator[T]:
    """Iterate ``items`` with a :func:`progress` bar."""
    bar = progress(total, desc, unit=unit)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
