"""Progress of long work (mksquashfs of an image, package downloads, chroot creation, the
unpacking of a module package).

When standard error is a terminal, one live line there is rewritten in place. Anywhere else (a
log, CI) work that lasts more than a moment prints a plain line every 10 % or every 5 seconds,
whichever comes first, on standard output beside doit's task lines: standard error stays for
errors (one line each). `qlimage build --quiet` calls `silence()`.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Protocol

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


def process_stdout() -> IO[str]:
    """Where a log's plain lines go: the process's own standard output. Inside a build task
    `sys.stdout` is doit's capture (a task's output is shown only when it fails), which would
    keep every line from the log until the task ended, and then drop them."""
    return sys.__stdout__ or sys.stdout


def say(text: str) -> None:
    """A line a build task has for the log as it happens (what a boot test boots, how it
    ended): on the process's standard output, like the plain progress lines."""
    print(text, file=process_stdout(), flush=True)


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
        prefix: str = "qlimage",
        live: bool | None = None,
    ) -> None:
        """`prefix` starts each line (a daemon's name); `live` False keeps a terminal to plain
        lines too (a daemon's log, which other lines share)."""
        self.label = label
        self.total = max(float(total), 0.0)
        self.as_bytes = as_bytes
        self.prefix = prefix
        if live is None:
            live = sys.stderr.isatty() if stream is None else stream.isatty()
        self.live = live
        self.stream = stream or (sys.stderr if self.live else process_stdout())
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
        return f"{self.prefix}: {self.label}: {self.percent():3.0f} % ({amount}{extra})"

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

    def abandon(self) -> None:
        """The work stopped short (its tool failed): a live line ends where it stands, so that
        the error starts on a line of its own; a log already has its lines."""
        if self.live and self.shown and not self.quiet:
            self.stream.write("\n")
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


# --- mmdebstrap ------------------------------------------------------------------------------
# mmdebstrap draws its own bar only on a terminal and keeps apt's status fd to itself, so a
# chroot's progress is read from `mmdebstrap --verbose`: its stage lines (`I: ...`) and the lines
# apt and dpkg print. Those carry real counts: apt says how many packages it installs and how
# many bytes it must fetch, then names each package (with its size) as it fetches it; dpkg
# unpacks and sets up each package once. mmdebstrap's own extraction prints nothing: no share.
APT_UNITS = {"B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
APT_SIZE = r"([0-9]+(?:\.[0-9]+)?) ?([kMGT]?B)"
APT_NEED = re.compile(rf"Need to get {APT_SIZE}(?:/{APT_SIZE})? of archives\.")
APT_NEW = re.compile(r"[0-9]+ upgraded, ([0-9]+) newly installed, ")
APT_GET = re.compile(rf"Get:[0-9]+ \S+ .* \[{APT_SIZE}\]$")
DPKG_STEPS = ("Unpacking ", "Setting up ")  # each package is unpacked once and set up once
TOOL_TAIL = 12  # lines of a tool's output kept for its error


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def apt_bytes(number: str, unit: str) -> float:
    """apt's rounded sizes (`206 kB`, `10.2 MB`, `0 B`: powers of 1000) as bytes."""
    return float(number) * APT_UNITS[unit]


class MmdebstrapLog:
    """Reads `mmdebstrap --verbose` output into one Progress per phase under `label`: the
    download (bytes of apt's "Need to get", and packages), then each install (packages unpacked
    and set up, of apt's "newly installed"). `make` builds each Progress (tests: a clock and a
    stream); the last lines are kept for an error message."""

    def __init__(self, label: str, make: Callable[..., Progress] = Progress) -> None:
        self.label = label
        self.make = make
        self.pending = b""
        self.shown: Progress | None = None
        self.phase = ""  # "download" or "install": what `shown` counts
        self.packages = 0  # apt's latest "N newly installed"
        self.fetched = 0
        self.steps = 0
        self.tail: deque[str] = deque(maxlen=TOOL_TAIL)

    def feed(self, chunk: bytes) -> None:
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        for raw in lines:
            self.line(raw.decode(errors="replace").rstrip("\r"))

    def line(self, text: str) -> None:
        if text.strip():
            self.tail.append(text)
        if text.startswith("I: "):  # a new stage of mmdebstrap's: whatever was counted ended
            self.end_phase()
        elif need := APT_NEED.match(text):
            self.start_download(apt_bytes(need[1], need[2]))
        elif new := APT_NEW.match(text):
            self.packages = int(new[1])
        elif self.phase == "download" and (get := APT_GET.match(text)):
            self.fetched += 1
            self.count(
                self.done() + apt_bytes(get[1], get[2]),
                plural(self.fetched, "package") + " fetched",
            )
        elif text.startswith(DPKG_STEPS) and self.packages:
            if self.phase != "install":
                self.end_phase()
                self.begin("install", self.make(self.label, self.packages))
                self.steps = 0
            self.steps += 1
            self.count(self.steps / 2, "installing packages")

    def start_download(self, size: float) -> None:
        self.end_phase()
        if size > 0:  # everything came from the cache: nothing to show
            self.begin("download", self.make(self.label, size, as_bytes=True))
            self.fetched = 0

    def begin(self, phase: str, shown: Progress) -> None:
        self.phase, self.shown = phase, shown

    def done(self) -> float:
        return self.shown.done if self.shown else 0.0

    def count(self, done: float, extra: str) -> None:
        if self.shown is not None:
            self.shown.update(min(done, self.shown.total), extra)

    def end_phase(self) -> None:
        if self.shown is not None:
            self.shown.finish()
        self.shown, self.phase = None, ""

    def close(self, ok: bool) -> None:
        """The tool ended: a phase it completed gets its last line; after a failure a live line
        ends where it stood, not at 100 %."""
        if self.pending:
            self.line(self.pending.decode(errors="replace"))
            self.pending = b""
        if ok:
            self.end_phase()
        elif self.shown is not None:
            self.shown.abandon()
            self.shown, self.phase = None, ""


# --- a file read by another process ----------------------------------------------------------
# Tools that print no progress of their own (dpkg-deb -x) are measured from outside, as `pv -d
# PID` does: the kernel keeps the offset of every open file description in
# /proc/PID/fdinfo/FD `pos:`, and a tool's forked children share the description they
# inherited, so the offset of the archive it unpacks is the compressed bytes it has consumed.
# dpkg-deb -x (1.21) closes the .deb in its first process once it has forked the copier of the
# data member and the decompressor, which both hold it: the tool's descendants are searched.
# The file is matched by device and inode (what the fd link stats to), never by the link's
# text: that is rewritten for deleted files and is anything for paths with odd characters.
MAX_PROCESSES = 32  # processes of one tool looked at: dpkg-deb runs 4
MAX_FDS = 256  # descriptors of one process looked at: dpkg-deb holds a handful


def file_position(pid: int, st_dev: int, st_ino: int) -> int | None:
    """The offset of the file (`st_dev`, `st_ino`) in the first descriptor of process `pid`
    that has it open, or None: not open there, or the process or descriptor went away while
    we looked (a tool's children come and go; a race is not an error here)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return None
    for fd in fds[:MAX_FDS]:
        try:
            st = os.stat(f"{fd_dir}/{fd}")
            if (st.st_dev, st.st_ino) != (st_dev, st_ino):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                for line in info:
                    if line.startswith("pos:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            continue
    return None


def process_family(pid: int) -> list[int]:
    """`pid` and its descendants, at most MAX_PROCESSES, parents first (from each thread's
    /proc/PID/task/TID/children, Linux >= 4.2 with CONFIG_PROC_CHILDREN as Debian's kernels
    have it; without it, `pid` alone). A process starting or ending meanwhile may be missed."""
    family: list[int] = []
    pending = [pid]
    while pending and len(family) < MAX_PROCESSES:
        current = pending.pop(0)
        family.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as children:
                    pending += [int(child) for child in children.read().split()]
            except (OSError, ValueError):
                continue
    return family


class Running(Protocol):
    """A started process, as `run(on_tick=)` hands it over (a subprocess.Popen)."""

    pid: int


class ReadPosition:
    """Shows on `progress` how far a running tool has read `path`: pass `tick` to
    `run(on_tick=)`. The offset only moves forward on the line: a tool that seeks back (or a
    child holding a second description of the file) never makes the bar go backwards."""

    def __init__(self, st: os.stat_result, progress: Progress) -> None:
        """`st`: the file's stat (what the tool's descriptor of it must stat to)."""
        self.key = (st.st_dev, st.st_ino)
        self.progress = progress

    def tick(self, proc: Running) -> None:
        if self.progress.quiet:  # --quiet: not even the look into /proc
            return
        for pid in process_family(proc.pid):
            position = file_position(pid, *self.key)
            if position is not None:
                if position > self.progress.done:
                    self.progress.update(min(position, self.progress.total))
                return


@contextlib.contextmanager
def reading(path: Path, label: str) -> Iterator[Callable[[Running], None]]:
    """A progress line (bytes) of how far a tool reads `path`, as `label`: yields the tick for
    `run(on_tick=)`; the line ends at 100 % when the block ends well and where it stood when
    it fails, so that the error starts on a line of its own. A file that cannot be looked at
    (gone since the plan) gets no line: the tool says what is wrong with it, as without one."""
    try:
        st = os.stat(path)
    except OSError:
        yield lambda proc: None
        return
    shown = Progress(label, st.st_size, as_bytes=True)
    try:
        yield ReadPosition(st, shown).tick
    except BaseException:
        shown.abandon()
        raise
    shown.finish()
