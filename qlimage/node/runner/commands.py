"""Running programs on the node: PATH lookup, the subprocess runner, logged runs."""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from collections.abc import Sequence
from typing import Protocol

from . import paths
from .report import Reporter


class Runner(Protocol):
    """Runs argv (no shell) and returns (exit status, stdout+stderr). `input`, when given,
    is the command's standard input; callers pass it only when they need it, so a runner
    taking just argv still serves every other command."""

    def __call__(self, argv: Sequence[str], input: str | None = None) -> tuple[int, str]: ...


def exec_path() -> str:
    return os.environ.get("PATH") or paths.SEARCH_PATH


def find_program(name: str) -> str | None:
    for directory in exec_path().split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.stat(candidate).st_mode & 0o111:
            return candidate
    return None


def run_command(argv: Sequence[str], input: str | None = None) -> tuple[int, str]:
    """Run argv (no shell), stdout+stderr combined, with `input` (or nothing) as its standard
    input. Returns (status, output); a signal becomes 128+N and a program that cannot be
    started 126/127, as in the shell."""
    env = dict(os.environ)
    env.setdefault("PATH", paths.SEARCH_PATH)
    # Output goes to a file, not a pipe: a script that starts a daemon in the background
    # would otherwise keep the pipe open and block us until the daemon exits. The input is
    # a file too, so a command that does not read it cannot block us either.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as stdin:
        if input is not None:
            stdin.write(input.encode("utf-8"))
            stdin.seek(0)
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL if input is None else stdin,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        except FileNotFoundError as e:
            return 127, f"{argv[0]}: {e.strerror}\n"
        except OSError as e:
            return 126, f"{argv[0]}: {e.strerror or e}\n"
        note = ""
        try:
            status = proc.wait(timeout=paths.COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status, note = 124, f"killed after {paths.COMMAND_TIMEOUT:g}s\n"
        out.seek(0)
        output = out.read().decode("utf-8", errors="replace") + note
    return (128 - status if status < 0 else status), output


def run_logged(
    argv: Sequence[str], run: Runner, reporter: Reporter, label: str, *, input: str | None = None
) -> int:
    return run_captured(argv, run, reporter, label, input=input)[0]


def run_captured(
    argv: Sequence[str], run: Runner, reporter: Reporter, label: str, *, input: str | None = None
) -> tuple[int, str]:
    """Run `argv`, logging the command and its output; the status and the output."""
    reporter.detail(f"running {shlex.join(argv)}")
    if input is None:
        status, output = run(list(argv))
    else:
        reporter.output(f"{label} stdin", input)
        status, output = run(list(argv), input=input)
    reporter.output(label, output)
    if status != 0:
        reporter.detail(f"{shlex.join(argv)} exited with status {status}")
    return status, output
