"""Reporting: `qlustar: ...` console lines, runner.log, and small text-file helpers."""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


class Reporter:
    """`qlustar: ...` lines on the console for the admin watching the boot; the same
    lines plus details and command output in runner.log."""

    def __init__(self, *, debug: bool = False) -> None:
        self.debug = debug
        self._log: TextIO | None = None

    def open_log(self, log_dir: str) -> None:
        try:
            create_log_dir(log_dir)
            # Kept open for the whole run and closed by close().
            self._log = open(  # noqa: SIM115
                os.path.join(log_dir, "runner.log"), "a", encoding="utf-8"
            )
        except OSError as e:
            # Logging is a convenience; configuring the node matters more.
            self.warn(f"cannot open {log_dir}/runner.log ({e}); logging to the console only")

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def step(self, message: str) -> None:
        self._console(message)
        self._write(message)

    def warn(self, message: str) -> None:
        self.step(f"WARNING: {message}")

    def error(self, message: str) -> None:
        self.step(f"ERROR: {message}")

    def detail(self, message: str) -> None:
        """Always logged; shown on the console only with `debug` on the kernel cmdline."""
        self._write(message)
        if self.debug:
            self._console(message)

    def output(self, label: str, text: str) -> None:
        """Log a command's output, one line per output line, tagged with `label`."""
        for line in text.splitlines():
            self.detail(f"[{label}] {line}")

    def _console(self, message: str) -> None:
        # Looked up per call: the console stream may be replaced (and is, under pytest).
        print(f"qlustar: {message}", file=sys.stdout, flush=True)

    def _write(self, message: str) -> None:
        if self._log is None:
            return
        try:
            self._log.write(f"{timestamp()} {message}\n")
            self._log.flush()  # the node may hang or be reset at any later point
        except OSError:
            self._log = None


def create_log_dir(path: str) -> None:
    if not os.path.isdir(path):
        os.makedirs(path, mode=0o755, exist_ok=True)
        os.chmod(path, 0o755)  # independent of the umask


def append_file(path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None
