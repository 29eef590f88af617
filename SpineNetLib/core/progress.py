"""Progress reporting for long steps, without global state.

A progress callback has the signature ``progress(done, total, message)``.
:class:`StderrProgress` draws a bar on a terminal and prints plain, throttled
lines otherwise (log files, CI, Slicer's worker process), so a user always
sees what the tool is doing.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Protocol, TextIO


class ProgressCallback(Protocol):
    def __call__(self, done: int, total: int, message: str) -> None: ...


def no_progress(done: int, total: int, message: str) -> None:
    """A progress callback that ignores everything."""


class StderrProgress:
    """Progress on a stream: a redrawn bar on a terminal, plain lines elsewhere."""

    def __init__(self, stream: TextIO | None = None, min_interval_s: float = 1.0):
        self.stream = stream if stream is not None else sys.stderr
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval_s = min_interval_s
        self._last_message = None
        self._last_time = 0.0
        self._bar_open = False

    def __call__(self, done: int, total: int, message: str) -> None:
        now = time.monotonic()
        total = max(int(total), 1)
        done = min(max(int(done), 0), total)
        if self.is_tty:
            width = 30
            filled = int(round(width * done / total))
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r{message:<28.28} [{bar}] {done}/{total}")
            self._bar_open = True
            if done >= total:
                self.stream.write("\n")
                self._bar_open = False
            self.stream.flush()
            return
        # Plain lines: always report a new step and its end, throttle the rest.
        new_step = message != self._last_message
        if new_step or done >= total or now - self._last_time >= self.min_interval_s:
            self.stream.write(f"{message}: {done}/{total}\n")
            self.stream.flush()
            self._last_time = now
        self._last_message = message

    def close(self) -> None:
        if self._bar_open:
            self.stream.write("\n")
            self.stream.flush()
            self._bar_open = False


def scaled(progress: Callable[[int, int, str], None] | None, message: str):
    """A callback that reports under a fixed message (used per pipeline stage)."""
    if progress is None:
        return None

    def report(done: int, total: int, _message: str = "") -> None:
        progress(done, total, message)

    return report
