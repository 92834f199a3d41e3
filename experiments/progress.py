"""Progress bars for a terminal, a few plain lines for a log file: the one helper every bar goes through.

`tqdm(...)` takes tqdm's arguments. When stderr is a terminal it is `tqdm.auto.tqdm`. When it is not
(`make run > log 2>&1`, a batch job, CI), a bar redrawn with carriage returns would put thousands of
updates into the file, so the bar becomes a `LineProgress` instead: a line when it passes another tenth
of its total, at most one per MIN_INTERVAL_S (a bar of a few seconds writes only its last line), and one
when it ends, with the count, the elapsed time and its postfix:

    train teacher: 100/1000 (10%) 57s loss=2.1034 tok_s=6,512
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable

from tqdm.auto import tqdm as _terminal_tqdm

LINES = 10
"""A line each time a bar passes another 1/LINES of its total..."""
MIN_INTERVAL_S = 10.0
"""...unless the last line is more recent than this (the last line of a bar is always written)."""


class LineProgress:
    """The subset of tqdm's interface the project uses (iterate, `update`, assign `n`, `set_postfix`,
    `close`, context manager), written as at most LINES + 1 plain lines per bar."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        desc: str | None = None,
        total: float | None = None,
        initial: float = 0,
        disable: bool = False,
        file=None,
        **_ignored: Any,
    ):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.desc, self.total, self.n, self.disable = desc or "", total, initial, disable
        self.file = file
        self.postfix = ""
        self.start = self.logged_at = time.monotonic()
        self.logged_n = initial  # a resumed bar (initial > 0) reports only what happens from here
        self.logged_tenth = self._tenth(initial)

    def _tenth(self, n: float) -> int:
        return int(LINES * n // self.total) if self.total else 0

    def _log(self) -> None:
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        count = f"{self.n:g}/{self.total:g}" if self.total is not None else f"{self.n:g}"
        line = f"{self.desc}: {count}{pct} {time.monotonic() - self.start:.0f}s" + (
            f" {self.postfix}" if self.postfix else ""
        )
        print(line, file=self.file or sys.stderr, flush=True)
        self.logged_n, self.logged_tenth, self.logged_at = self.n, self._tenth(self.n), time.monotonic()

    def refresh(self) -> None:
        """Log a line if the count has crossed into another tenth of the total since the last line (and that
        line is MIN_INTERVAL_S old), or reached the total."""
        if self.disable or self._tenth(self.n) <= self.logged_tenth:
            return
        if time.monotonic() - self.logged_at >= MIN_INTERVAL_S or (self.total and self.n >= self.total):
            self._log()

    def update(self, n: float = 1) -> None:
        self.n += n
        self.refresh()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())
        if refresh:
            self.refresh()

    def close(self) -> None:
        if not self.disable and self.n != self.logged_n:  # the last line: where the bar stopped
            self._log()
        self.disable = True

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tqdm(*args: Any, **kwargs: Any):
    """A progress bar: tqdm's on a terminal, LineProgress otherwise (decided when the bar is made, from
    the stream it writes to: `file=` or stderr)."""
    stream = kwargs.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return _terminal_tqdm(*args, **kwargs)
    return LineProgress(*args, **kwargs)
