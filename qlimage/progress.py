"""Progress of long work (mksquashfs of an image, package downloads).

When standard error is a terminal, one live line there is rewritten in place. Anywhere else (a
log, CI) work that lasts more than a moment prints a plain line every 10 % or every 5 seconds,
whichever comes first, on standard output beside doit's task lines: standard error stays for
errors (one line each). `qlimage build --quiet` calls `silence()`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO

PLAIN_STEP = 10.0  # percent between plain lines
PLAIN_EVERY = 5.0  # seconds between plain lines at the most
LIVE_EVERY = 0.1  # seconds between redraws of the live line
PLAIN_AFTER = 2.0  # seconds before the first plain line: short work stays silent in logs

_silenced = False


def silence() -> None:
    global _silenced
    _silenced = True


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # not reached


class Progress:
    """One piece of work of `total` units (bytes with `as_bytes`), reported as `label`."""

    def __init__(
        self,
        label: str,
        total: float,
        *,
        as_bytes: bool = False,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = max(float(total), 0.0)
        self.as_bytes = as_bytes
        self.live = sys.stderr.isatty() if stream is None else stream.isatty()
        self.stream = stream or (sys.stderr if self.live else sys.stdout)
        self.clock = clock
        self.started = clock()
        self.quiet = _silenced
        self.done = 0.0
        self.extra = ""
        self.last_time = self.clock()
        self.last_percent = 0.0
        self.shown = False

    def percent(self) -> float:
        return 100.0 * min(self.done / self.total, 1.0) if self.total else 100.0

    def text(self) -> str:
        amount = (
            f"{human_bytes(self.done)} of {human_bytes(self.total)}"
            if self.as_bytes
            else f"{self.done:.0f}/{self.total:.0f}"
        )
        extra = f", {self.extra}" if self.extra else ""
        return f"qlimage: {self.label}: {self.percent():3.0f} % ({amount}{extra})"

    def update(self, done: float, extra: str = "") -> None:
        """The work is `done` units far (`extra`: a short note, e.g. `3/12 packages`)."""
        self.done = done
        self.extra = extra
        if self.quiet:
            return
        now = self.clock()
        if self.live:
            if now - self.last_time >= LIVE_EVERY or not self.shown:
                self.stream.write("\r\033[K" + self.text())
                self.stream.flush()
                self.shown = True
                self.last_time = now
        elif now - self.started >= PLAIN_AFTER and (
            self.percent() - self.last_percent >= PLAIN_STEP
            or now - self.last_time >= PLAIN_EVERY
            or not self.shown
        ):
            self.stream.write(self.text() + "\n")
            self.stream.flush()
            self.last_time, self.last_percent, self.shown = now, self.percent(), True

    def advance(self, units: float, extra: str = "") -> None:
        self.update(self.done + units, extra)

    def finish(self) -> None:
        """The last line: the work is complete (on a terminal the live line ends)."""
        if self.quiet or not self.shown:
            return
        self.done = max(self.done, self.total)
        if self.live:
            self.stream.write("\r\033[K" + self.text() + "\n")
        elif self.last_percent < 100.0:
            self.stream.write(self.text() + "\n")
        self.stream.flush()


class SquashfsBar:
    """Reads mksquashfs' progress bar (`\\r[===/   ]  177/1234  14%`) from its output."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.pending = b""

    def feed(self, chunk: bytes) -> None:
        *complete, self.pending = (self.pending + chunk).replace(b"\n", b"\r").split(b"\r")
        for piece in reversed(complete):
            fields = piece.decode(errors="replace").split("]")[-1].split()
            if len(fields) >= 2 and "/" in fields[0]:
                done, _, total = fields[0].partition("/")
                if done.isdigit() and total.isdigit() and int(total):
                    self.progress.total = float(total)
                    self.progress.update(float(done))
                    return
