"""Progress output for long loops: a tqdm bar on a terminal, plain periodic lines in logs.

    from calibrl_verl.progress import progress

    bar = progress(rows, total=len(rows), desc="math500", unit="row")
    for row in bar:
        ...
        bar.set_postfix(acc=f"{100 * correct / bar.n:.1f}%")

On a terminal (stderr is a tty) this is a tqdm bar. Otherwise (a log file, a pipe, a job scheduler) a bar's
carriage returns would fill the log with one unreadable line, so plain lines are printed instead, as verl's trainer
logs do::

    [math500] 128/500 rows (25.6%) 3.1 rows/s elapsed 41s, acc=42.2%

A line is printed every ``every`` items (when set), at most ``interval`` seconds apart otherwise, and once at the
end. Environment overrides (useful for batch jobs and tests): ``CALIBRL_PROGRESS`` = ``auto`` (default) / ``bar``
/ ``lines`` / ``off``, ``CALIBRL_PROGRESS_EVERY`` (items between lines), ``CALIBRL_PROGRESS_INTERVAL`` (seconds,
default 30).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

MODES = ("auto", "bar", "lines", "off")
DEFAULT_INTERVAL_S = 30.0


class Progress:
    """Counts items, shows them as a tqdm bar or periodic lines; iterate it, or call ``update`` yourself."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        *,
        every: int | None = None,
        interval: float | None = None,
        mode: str | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = 0
        self.stream = stream if stream is not None else sys.stderr
        self.mode = _resolve_mode(mode, self.stream)
        self.every = every if every is not None else _env_int("CALIBRL_PROGRESS_EVERY")
        if interval is None:
            interval = _env_float("CALIBRL_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S)
        self.interval = interval
        self.postfix = ""
        self._start = self._last_line = time.monotonic()
        self._closed = False
        self._printed_n: int | None = None  # the count the last plain line showed
        self._bar = self._make_bar() if self.mode == "bar" else None

    def _make_bar(self) -> Any:
        from tqdm import tqdm

        return tqdm(total=self.total, desc=self.desc, unit=self.unit, file=self.stream, dynamic_ncols=True)

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("Progress was created without an iterable; call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more items done; prints a line when one is due."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines" and self._line_due(n):
            self._print_line()

    def set_postfix(self, **values: Any) -> None:
        """Text after the counts, e.g. ``set_postfix(acc="42.0%", kept=10)``; shown with the next bar refresh/line."""
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())
        if self._bar is not None:
            self._bar.set_postfix_str(self.postfix, refresh=False)

    def close(self) -> None:
        """Finish: closes the bar, or prints the final line (once)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and self._printed_n != self.n:  # not twice for the same count
            self._print_line()

    def _line_due(self, n: int) -> bool:
        if self.every and self.n // self.every != (self.n - n) // self.every:
            return True
        return time.monotonic() - self._last_line >= self.interval

    def _print_line(self) -> None:
        self._last_line = time.monotonic()
        self._printed_n = self.n
        print(self.format_line(self._last_line - self._start), file=self.stream, flush=True)

    def format_line(self, elapsed: float) -> str:
        """``[desc] n/total unit (pct%) rate unit/s elapsed Ns, postfix``."""
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        pct = f" ({100.0 * self.n / self.total:.1f}%)" if self.total else ""
        rate = f" {self.n / elapsed:.1f} {self.unit}/s" if elapsed > 0 else ""
        prefix = f"[{self.desc}] " if self.desc else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        return f"{prefix}{count} {self.unit}{pct}{rate} elapsed {elapsed:.0f}s{postfix}"


def progress(
    iterable: Iterable[Any] | None = None,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    **kwargs: Any,
) -> Progress:
    """A :class:`Progress` over ``iterable`` (``total`` defaults to ``len(iterable)`` when it has one)."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return Progress(iterable, total, desc, unit, **kwargs)


def _resolve_mode(mode: str | None, stream: TextIO) -> str:
    mode = mode or os.environ.get("CALIBRL_PROGRESS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"CALIBRL_PROGRESS / mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        isatty = getattr(stream, "isatty", None)
        return "bar" if callable(isatty) and isatty() else "lines"
    return mode


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from exc
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return number
