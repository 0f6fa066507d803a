"""Every external program the head runs goes through here (model: mkosi's `mkosi/run.py`).

`run()` is for short commands: `spawn()` plus `communicate()`, with an optional time limit.
`spawn()` is for long-running programs (QEMU; dnsmasq, nginx, udp-sender): a context manager
yielding the process that always stops and reaps it, and its whole process group, on the way out,
exceptions and Ctrl-C included.

Both look the tool up first (a missing one names its Debian package), never use a shell, start
the child in a session of its own (so that everything it starts can be stopped with it) and set
LC_ALL=C.UTF-8, so that the tool messages we parse and show do not depend on the admin's locale.
A failure's message carries the full command line and the last lines of the tool's stderr.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

from qlimage.errors import BuildError, CommandTimeout, ToolMissing

# Where a child's stdin, stdout or stderr goes, as in subprocess (re-exported here so that no
# other module needs subprocess): PIPE, DEVNULL, STDOUT (stderr only), an open file, or None
# (inherited from us).
PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT
Stream = int | IO[Any] | None
Command = Sequence[str | os.PathLike[str]]

LOCALE = "C.UTF-8"
STDERR_LINES = 5  # how many of the last stderr lines an error shows
STDERR_LINE_CHARS = 400  # ... each cut to this length
COMMAND_CHARS = 1000  # a longer command line is shown shortened in the middle
GRACE = 5.0  # seconds between SIGTERM and SIGKILL when a child is stopped
TICK = 0.15  # seconds between calls of run(on_tick=): a live progress line's pace

# Which Debian package provides each external program we call, so that a missing tool
# tells the admin exactly what to install. The head calls: cp, cpio, depmod, diffoscope,
# dpkg-deb, faketime, gpgv, gzip, mksquashfs, qemu-system-x86_64; the rest are the node-side and
# test tools and the daemons to come.
DEBIAN_PACKAGE = {
    "mksquashfs": "squashfs-tools",
    "unsquashfs": "squashfs-tools",
    "cpio": "cpio",
    "gzip": "gzip",
    "cp": "coreutils",
    "find": "findutils",
    "env": "coreutils",
    "depmod": "kmod",
    "modinfo": "kmod",
    "dpkg-deb": "dpkg",
    "dpkg": "dpkg",
    "apt-get": "apt",
    "busybox": "busybox-static",
    "qemu-system-x86_64": "qemu-system-x86",
    "dnsmasq": "dnsmasq-base",
    "nginx": "nginx",
    "udp-sender": "udpcast",
    "udp-receiver": "udpcast",
    "gethostip": "syslinux-utils",
    "systemd-analyze": "systemd",
    "systemd-escape": "systemd",
    "ifquery": "ifupdown",
    "ssh-keygen": "openssh-client",
    "diffoscope": "diffoscope-minimal",
    "faketime": "faketime",
    "zstd": "zstd",
    "xz": "xz-utils",
    "gpgv": "gpgv",
    "mkpasswd": "whois",
    "mmdebstrap": "mmdebstrap",
}


def find_tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        package = DEBIAN_PACKAGE.get(name, name)
        raise ToolMissing(f"{name}: command not found", hint=f"apt-get install {package}")
    return path


def resolve(cmd: Command) -> list[str]:
    """`cmd` as strings, its program looked up on PATH (and /usr/sbin, /sbin) unless a path."""
    argv = [os.fspath(c) for c in cmd]
    if not argv:
        raise ValueError("empty command")
    if "/" not in argv[0]:
        argv[0] = find_tool(argv[0])
    return argv


def child_env(env: Mapping[str, str] | None, unset: Sequence[str]) -> dict[str, str]:
    """Our environment, plus `env`, minus `unset`, and always LC_ALL=C.UTF-8."""
    full = dict(os.environ)
    full.update(env or {})
    for name in unset:
        full.pop(name, None)
    full["LC_ALL"] = LOCALE
    return full


def command_line(argv: Sequence[str]) -> str:
    """The command as a shell would take it, cut in the middle when it is huge."""
    line = shlex.join(argv)
    if len(line) <= COMMAND_CHARS:
        return line
    head, tail = COMMAND_CHARS * 3 // 4, COMMAND_CHARS // 4
    return f"{line[:head]} ...[{len(line) - head - tail} characters]... {line[-tail:]}"


def stderr_tail(stderr: bytes | None, lines: int = STDERR_LINES) -> list[str]:
    """The last `lines` non-blank lines of `stderr`, each cut to a readable length."""
    if not stderr:
        return []
    text = stderr.decode(errors="replace").replace("\r", "\n")
    kept = [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]
    return [
        line if len(line) <= STDERR_LINE_CHARS else line[:STDERR_LINE_CHARS] + " ..."
        for line in kept
    ]


def failure_details(argv: Sequence[str], stderr: bytes | None, *, all_lines: bool) -> str:
    """The indented lines after an error's first line: the command, then the stderr tail
    (`all_lines` False: only when there is more than the one line the first line shows)."""
    details = [f"  command: {command_line(argv)}"]
    tail = stderr_tail(stderr)
    if tail and (all_lines or len(tail) > 1):
        details += ["  stderr:", *(f"    {line}" for line in tail)]
    return "\n".join(details)


def status_text(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"{returncode} ({signal.Signals(-returncode).name})"
    return str(returncode)


def failure_message(argv: Sequence[str], returncode: int, stderr: bytes | None) -> str:
    """`<tool> failed with status N: <last stderr line>`, then the command and stderr tail."""
    tail = stderr_tail(stderr)
    last = tail[-1].strip() if tail else "no error output"
    first = f"{Path(argv[0]).name} failed with status {status_text(returncode)}: {last}"
    return f"{first}\n{failure_details(argv, stderr, all_lines=False)}"


def start_error(argv: Sequence[str], cwd: str | os.PathLike[str] | None, e: OSError) -> Exception:
    """What a failed start means: no such program, an unusable one or a bad working directory."""
    if cwd is not None and e.filename is not None and os.fspath(e.filename) == os.fspath(cwd):
        return BuildError(f"cannot run {command_line(argv)}: {cwd}: {e.strerror}")
    name = Path(argv[0]).name
    if isinstance(e, FileNotFoundError):
        package = DEBIAN_PACKAGE.get(name)
        return ToolMissing(
            f"{argv[0]}: not found", hint=f"apt-get install {package}" if package else None
        )
    return BuildError(f"cannot run {argv[0]}: {e.strerror}\n  command: {command_line(argv)}")


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send `sig` to the child's process group (it leads one: start_new_session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    if proc.returncode is None:  # not reaped yet: make sure the leader itself got it
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def group_alive(pgid: int) -> bool:
    """Whether any live (not zombie) process is left in process group `pgid`.

    Orphans are reaped by PID 1, which in containers may never happen: a zombie counts as gone.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] not in "ZX" and int(fields[2]) == pgid:
            return True
    return False


def stop(proc: subprocess.Popen[bytes], grace: float = GRACE) -> None:
    """Stop the child and its process group and reap the child: SIGTERM, and SIGKILL for
    whatever is still alive after `grace` seconds (at once on a second Ctrl-C)."""
    deadline = time.monotonic() + grace
    try:
        signal_group(proc, signal.SIGTERM)
        while time.monotonic() < deadline:
            proc.poll()
            if proc.returncode is not None and not group_alive(proc.pid):
                break
            time.sleep(0.02)
    finally:
        signal_group(proc, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def spawn(
    cmd: Command,
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    unset: Sequence[str] = (),
    stdin: Stream = DEVNULL,
    stdout: Stream = None,
    stderr: Stream = None,
    umask: int = -1,
    grace: float = GRACE,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start `cmd` (never through a shell) in a new session and yield the process; on the way
    out, however it is left, stop it and its process group (SIGTERM, SIGKILL after `grace`
    seconds), reap it and close its pipes."""
    argv = resolve(cmd)
    with signals_deferred() as caught:
        try:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=child_env(env, unset),
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                umask=umask,
                start_new_session=True,
            )
        except OSError as e:
            raise start_error(argv, cwd, e) from e
    try:
        for signum in caught:
            signal.raise_signal(signum)  # now the child is ours to stop
        yield proc
    finally:
        try:
            stop(proc, grace)
        finally:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_deferred() -> Iterator[list[int]]:
    """Note SIGINT and SIGTERM instead of acting on them for the length of the block, and give
    the caller the list to deliver afterwards. A Ctrl-C while Popen waits for its child's exec
    would raise inside Popen, which gives no process back to stop: the child, in a session of
    its own, would outlive us. (Only the main thread receives signals.)"""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def note(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)

    saved = {s: signal.signal(s, note) for s in DEFERRED_SIGNALS}
    try:
        yield caught
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def run(
    cmd: Command,
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    unset: Sequence[str] = (),
    input: bytes | None = None,
    capture: bool = False,
    check: bool = True,
    timeout: float | None = None,
    stdout: Stream = None,
    stderr: Stream = PIPE,
    umask: int = -1,
    on_stdout: Callable[[bytes], object] | None = None,
    on_tick: Callable[[subprocess.Popen[bytes]], object] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run `cmd` (never through a shell) to its end and return its status and output.

    With `on_stdout`, the child's stdout is handed to it chunk by chunk as it comes (a tool's
    progress bar) and not returned; no `timeout` and no `input` then. With `on_tick`, it is
    called with the process every TICK seconds while the command runs (progress measured from
    outside, e.g. progress.ReadPosition); no `timeout` and no `on_stdout` then.

    stdin is `input` (else /dev/null); stdout is returned with `capture`, else goes to `stdout`
    (default: ours); stderr is captured for the error message unless `stderr` sends it
    elsewhere. With `check`, a non-zero status raises BuildError. After `timeout` seconds the
    command and its process group are killed and CommandTimeout (a BuildError) is raised.
    """
    if capture or on_stdout:
        if stdout is not None:
            raise ValueError("capture or on_stdout and stdout are exclusive")
        if on_stdout and (timeout is not None or input is not None):
            raise ValueError("on_stdout takes no timeout and no input")
        stdout = PIPE
    if on_tick and (timeout is not None or on_stdout):
        raise ValueError("on_tick takes no timeout and no on_stdout")
    argv = resolve(cmd)
    with spawn(
        argv,
        cwd=cwd,
        env=env,
        unset=unset,
        stdin=DEVNULL if input is None else PIPE,
        stdout=stdout,
        stderr=stderr,
        umask=umask,
    ) as proc:
        try:
            if on_stdout:
                out, err = None, stream_stdout(proc, on_stdout)
            elif on_tick:
                out, err = communicate_ticking(proc, input, on_tick)
            else:
                out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            err = None
            with contextlib.suppress(subprocess.TimeoutExpired):
                err = proc.communicate(timeout=GRACE)[1]
            raise CommandTimeout(
                f"{Path(argv[0]).name} timed out after {timeout:g} s and was killed\n"
                + failure_details(argv, err, all_lines=True)
            ) from None
    if check and proc.returncode != 0:
        raise BuildError(failure_message(argv, proc.returncode, err))
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def stream_stdout(proc: subprocess.Popen[bytes], on_stdout: Callable[[bytes], object]) -> bytes:
    """Hand the child's stdout to `on_stdout` as it comes; its stderr is read meanwhile (by a
    thread, so that neither pipe can fill and stall the child) and returned. If `on_stdout`
    raises, `spawn` stops the child, which ends the thread."""
    err: list[bytes] = []
    reader = threading.Thread(
        target=lambda: err.append(proc.stderr.read() if proc.stderr else b""), daemon=True
    )
    reader.start()
    if proc.stdout is not None:
        while chunk := os.read(proc.stdout.fileno(), 65536):
            on_stdout(chunk)
    reader.join()
    proc.wait()
    return err[0] if err else b""


def communicate_ticking(
    proc: subprocess.Popen[bytes],
    input: bytes | None,
    on_tick: Callable[[subprocess.Popen[bytes]], object],
) -> tuple[Any, Any]:  # as Popen.communicate's: bytes, or None for a stream not piped
    """`proc.communicate(input)`, calling `on_tick(proc)` every TICK seconds until the child
    ends. communicate() may be called again after its timeout without losing output (it keeps
    the input it was given first), so stdin, stdout and stderr are handled exactly as without
    ticks. If `on_tick` raises, `spawn` stops the child."""
    while True:
        try:
            return proc.communicate(input, timeout=TICK)
        except subprocess.TimeoutExpired:
            input = None  # given once: a second time is an error
            on_tick(proc)


# fork_beside's copy starts its answer with this when its work went well.
DONE = b"d"


def fork_beside(work: Callable[[], bytes], meanwhile: Callable[[], object]) -> bytes | None:
    """What `work()` returns, computed by a forked copy of this process (no program is
    started) while this one runs `meanwhile`: time the copy spends in the kernel (stat calls)
    overlaps time this one spends in the interpreter (imports), which a thread's could not (it
    would wait for the interpreter lock at each call). None when the copy failed, for the
    caller to do the work itself (where the error shows), and without a copy in a process
    with other threads: a fork copies the calling thread alone, and a lock another one holds
    would never be released in the copy."""
    if threading.active_count() > 1:
        return None
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the copy: never returns
        status = 1
        try:
            os.close(read_end)
            with open(write_end, "wb") as out:
                out.write(DONE + work())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        with open(read_end, "rb") as answer:
            meanwhile()
            found = answer.read()
    finally:
        os.waitpid(pid, 0)
    return found[1:] if found[:1] == DONE else None


class Stopped(Exception):
    """SIGTERM: a foreground service leaves its loop the same way Ctrl-C does, so `spawn`
    stops and reaps its children on the way out."""


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise Stopped

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
