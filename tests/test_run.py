"""qlimage.run with real programs: error text, LC_ALL, time limits, spawn() stopping and reaping
whole process groups, missing tools; and a static check that nothing else starts programs."""

from __future__ import annotations

import ast
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qlimage import run as run_mod
from qlimage.errors import BuildError, CommandTimeout, QlimageError, ToolMissing
from qlimage.run import DEBIAN_PACKAGE, PIPE, STDOUT, run, spawn

PACKAGE = Path(run_mod.__file__).resolve().parent
# Code that runs on the node (standard library only) starts its programs itself.
NODE_SIDE = [PACKAGE / "node"]


def dead(pid: int) -> bool:
    """Gone, or a zombie nobody reaps yet (orphans go to PID 1, which may never reap them)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def wait_dead(pid: int, seconds: float = 2.0) -> bool:
    end = time.monotonic() + seconds
    while not dead(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def reaped(pid: int) -> bool:
    """Our child `pid` has been waited for: no such child any more."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def read_pids(path: Path, count: int, seconds: float = 5.0) -> list[int]:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists():
            words = path.read_text().split()
            if len(words) >= count:
                return [int(w) for w in words[:count]]
        time.sleep(0.02)
    raise AssertionError(f"{path}: no {count} pids")


# --- run() -------------------------------------------------------------------------------------


def test_failure_shows_command_line_and_stderr_tail() -> None:
    script = "for i in 1 2 3 4 5 6 7 8; do echo line$i >&2; done; exit 3"
    with pytest.raises(BuildError) as excinfo:
        run(["sh", "-c", script, "arg with space"])
    message = str(excinfo.value)
    assert isinstance(excinfo.value, QlimageError)
    first, *rest = message.splitlines()
    assert first == "sh failed with status 3: line8"  # the old one-line message, unchanged
    argv = [run_mod.find_tool("sh"), "-c", script, "arg with space"]
    assert f"  command: {shlex.join(argv)}" in rest
    assert [line.strip() for line in rest[-5:]] == [f"line{i}" for i in range(4, 9)]
    assert "line3" not in message


def test_failure_without_stderr_and_by_signal() -> None:
    with pytest.raises(BuildError, match=r"^false failed with status 1: no error output\n"):
        run(["false"])
    with pytest.raises(BuildError, match=r"status -9 \(SIGKILL\)"):
        run(["sh", "-c", "kill -9 $$"])


def test_huge_command_line_is_shortened() -> None:
    args = [f"argument-{i:05d}" for i in range(2000)]
    with pytest.raises(BuildError) as excinfo:
        run(["sh", "-c", "exit 1", *args])
    command = next(line for line in str(excinfo.value).splitlines() if "command:" in line)
    assert len(command) < 1200
    assert "argument-00000" in command and "argument-01999" in command
    assert "characters]..." in command


def test_check_false_returns_status_and_output() -> None:
    proc = run(["sh", "-c", "echo out; echo err >&2; exit 4"], capture=True, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (4, b"out\n", b"err\n")


def test_input_env_unset_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(["cat"], input=b"data", capture=True).stdout == b"data"
    monkeypatch.setenv("QLIMAGE_TEST_GONE", "1")
    script = 'echo "$LC_ALL|$QLIMAGE_TEST_SET|${QLIMAGE_TEST_GONE-unset}|$PWD"'
    out = run(
        ["sh", "-c", script],
        env={"QLIMAGE_TEST_SET": "yes"},
        unset=["QLIMAGE_TEST_GONE"],
        cwd=tmp_path,
        capture=True,
    ).stdout.decode()
    assert out == f"C.UTF-8|yes|unset|{tmp_path}\n"
    # No stdin from us: a tool that reads it sees end of file, never our terminal.
    assert run(["cat"], capture=True).stdout == b""


def test_lc_all_is_always_c_utf8(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    for env in (None, {"LC_ALL": "fr_FR.UTF-8"}):
        out = run(["sh", "-c", "echo $LC_ALL"], env=env, capture=True).stdout
        assert out == b"C.UTF-8\n"
    with spawn(["sh", "-c", "echo $LC_ALL"], stdout=PIPE) as proc:
        assert proc.stdout is not None
        assert proc.stdout.read() == b"C.UTF-8\n"


def test_stdout_to_a_file_with_stderr(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with log.open("wb") as f:
        proc = run(["sh", "-c", "echo out; echo err >&2"], stdout=f, stderr=STDOUT, umask=0o077)
    assert proc.returncode == 0
    assert log.read_text() == "out\nerr\n"


def test_timeout_kills_and_reaps_the_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"sleep 60 & echo $$ $! > {pids}; echo started >&2; wait"
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as excinfo:
        run(["sh", "-c", script], timeout=0.5)
    assert time.monotonic() - started < run_mod.GRACE + 3
    assert isinstance(excinfo.value, BuildError)
    message = str(excinfo.value)
    assert message.startswith("sh timed out after 0.5 s")
    assert "command: " in message and "sleep 60" in message
    assert "started" in message  # what stderr said so far
    shell, sleeper = read_pids(pids, 2)
    assert reaped(shell) and dead(shell)
    assert wait_dead(sleeper)


def test_grandchildren_left_behind_are_stopped(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    run(["sh", "-c", f"sleep 60 >/dev/null 2>&1 & echo $! > {pids}"])
    assert wait_dead(read_pids(pids, 1)[0])


# --- spawn() -----------------------------------------------------------------------------------


@pytest.fixture
def family(tmp_path: Path) -> Iterator[tuple[list[str], Path]]:
    """A shell that starts a grandchild and writes both pids, then waits."""
    pids = tmp_path / "pids"
    yield ["sh", "-c", f"sleep 60 & echo $$ $! > {pids}; wait"], pids


def test_spawn_stops_child_and_grandchildren_on_normal_exit(
    family: tuple[list[str], Path],
) -> None:
    cmd, pids = family
    with spawn(cmd) as proc:
        shell, sleeper = read_pids(pids, 2)
        assert shell == proc.pid and proc.poll() is None
    assert proc.returncode == -signal.SIGTERM
    assert reaped(shell) and dead(shell)
    assert wait_dead(sleeper)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_spawn_stops_child_and_grandchildren_on_exception(
    family: tuple[list[str], Path], error: type[BaseException]
) -> None:
    cmd, pids = family
    with pytest.raises(error), spawn(cmd) as proc:
        shell, sleeper = read_pids(pids, 2)
        raise error("stop")
    assert proc.returncode is not None
    assert reaped(shell) and dead(shell)
    assert wait_dead(sleeper)


def test_ctrl_c_while_the_child_starts_still_stops_it(
    family: tuple[list[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C lands while Popen waits for the child's exec: raised there, it would leave a child
    # no one can stop. spawn() holds it until the child is its own, then raises it.
    cmd, pids = family
    # As on a terminal: a shell without job control starts background jobs (this suite, too)
    # with SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    popen = subprocess.Popen
    started: list[subprocess.Popen[bytes]] = []

    def interrupted_popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = popen(*args, **kwargs)
        started.append(proc)
        read_pids(pids, 2)  # the family is up
        signal.raise_signal(signal.SIGINT)  # what the terminal sends, before Popen returns
        return proc

    monkeypatch.setattr(subprocess, "Popen", interrupted_popen)
    try:
        with pytest.raises(KeyboardInterrupt), spawn(cmd):
            pytest.fail("the body ran although Ctrl-C came first")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, saved)
    shell, sleeper = read_pids(pids, 2)
    assert started[0].returncode is not None
    assert reaped(shell) and dead(shell)
    assert wait_dead(sleeper)


def test_spawn_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"trap '' TERM; sh -c 'trap \"\" TERM; sleep 60' & echo $$ $! > {pids}; wait"
    started = time.monotonic()
    with spawn(["sh", "-c", script], grace=0.3) as proc:
        shell, child = read_pids(pids, 2)
    assert time.monotonic() - started < 3
    assert proc.returncode == -signal.SIGKILL
    assert reaped(shell) and dead(shell)
    assert wait_dead(child)


def test_spawn_pipes_and_closes_them() -> None:
    with spawn(["sh", "-c", "echo hello; echo oops >&2"], stdout=PIPE, stderr=STDOUT) as proc:
        assert proc.stdout is not None
        assert proc.stdout.read() == b"hello\noops\n"
        assert proc.wait() == 0
    assert proc.stdout.closed
    assert proc.returncode == 0


# --- missing tools -----------------------------------------------------------------------------


def test_missing_tool_names_its_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # mksquashfs is in /usr/bin, not /usr/sbin
    with pytest.raises(ToolMissing) as by_run:
        run(["mksquashfs", "-version"])
    with pytest.raises(ToolMissing) as by_spawn, spawn(["mksquashfs", "-version"]):
        pass
    for excinfo in (by_run, by_spawn):
        assert isinstance(excinfo.value, QlimageError)
        assert "mksquashfs: command not found" in str(excinfo.value)
        assert "apt-get install squashfs-tools" in str(excinfo.value)
    with pytest.raises(ToolMissing, match=r"apt-get install qlimage-no-such-tool\)"):
        run(["qlimage-no-such-tool"])


def test_missing_program_by_path_and_bad_cwd(tmp_path: Path) -> None:
    with pytest.raises(ToolMissing, match=r"/no/such/busybox: not found.*busybox-static"):
        run(["/no/such/busybox", "--list-full"])
    with pytest.raises(BuildError, match="no-such-dir"):
        run(["true"], cwd=tmp_path / "no-such-dir")
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(BuildError, match="Permission denied"):
        run([script])


# --- static: one way to run programs -----------------------------------------------------------

FORBIDDEN_OS = {"system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp"}


def head_modules() -> list[Path]:
    return [
        path
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "run.py" and not any(path == n or n in path.parents for n in NODE_SIDE)
    ]


def starts_programs(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                f"import {a.name}" for a in node.names if a.name.split(".")[0] == "subprocess"
            ]
        elif isinstance(node, ast.ImportFrom) and node.module in ("subprocess", "os"):
            names = [a.name for a in node.names]
            if node.module == "subprocess" or FORBIDDEN_OS.intersection(names):
                found.append(f"from {node.module} import {', '.join(names)}")
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
            and (node.attr in FORBIDDEN_OS or node.attr.startswith(("spawn", "exec")))
        ):
            found.append(f"os.{node.attr}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "__import__"
        ):
            found.append("__import__(...)")
    return found


def test_nothing_but_run_py_starts_programs() -> None:
    modules = head_modules()
    assert PACKAGE / "serve/vm.py" in modules
    problems = [
        f"{path.relative_to(PACKAGE.parent)}:{what}"
        for path in modules
        for what in starts_programs(ast.parse(path.read_text(), str(path)))
    ]
    assert problems == [], "use qlimage.run.run() or spawn() instead"


def program_names(tree: ast.AST) -> set[str]:
    """The literal program names of the head's command lists: the first argument of run() and
    spawn() calls, lists assigned to `cmd` and lists returned by `*_command` functions."""
    lists: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
            if node.func.id in ("run", "spawn"):
                lists.append(node.args[0])
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "cmd" for t in targets) and node.value:
                lists.append(node.value)
        elif isinstance(node, ast.FunctionDef) and node.name.endswith("_command"):
            lists += [r.value for r in ast.walk(node) if isinstance(r, ast.Return) and r.value]
    return {
        Path(first.value).name
        for expr in lists
        if isinstance(expr, ast.List) and expr.elts
        for first in [expr.elts[0]]
        if isinstance(first, ast.Constant) and isinstance(first.value, str)
    }


def test_every_tool_the_head_calls_names_its_package() -> None:
    names: set[str] = set()
    for path in head_modules():
        names |= program_names(ast.parse(path.read_text(), str(path)))
    assert {"mksquashfs", "qemu-system-x86_64", "dpkg-deb", "cpio"} <= names  # the scan works
    assert sorted(names - DEBIAN_PACKAGE.keys()) == []
    # and the programs found by variable: diffoscope, faketime (repro-check)
    assert {"diffoscope", "faketime"} <= DEBIAN_PACKAGE.keys()


# --- fork_beside: work of a forked copy beside this process's own -------------------------------
# Each case runs in a fresh interpreter: a test process may have threads of other tests alive,
# and then fork_beside (rightly) does not fork.
FORK_CASE = """
import os, sys, threading, time
from pathlib import Path
from qlimage.run import fork_beside

flag = Path(sys.argv[1])
case = sys.argv[2]
parent = os.getpid()


def waits_for_meanwhile() -> bytes:
    # Bounded: the copy gives up after 10 s, which the test then sees.
    for _ in range(1000):
        if flag.exists():
            return f"copy {os.getpid()} saw {flag.read_text()}".encode()
        time.sleep(0.01)
    return b"meanwhile never ran"


def fails() -> bytes:
    raise OSError("the copy fails")


def meanwhile() -> None:
    flag.write_text("meanwhile")


if case == "thread":
    stop = threading.Event()
    threading.Thread(target=stop.wait).start()
    print(fork_beside(waits_for_meanwhile, meanwhile))
    stop.set()
else:
    found = fork_beside(waits_for_meanwhile if case == "overlap" else fails, meanwhile)
    print(found.decode() if found else found, "parent", parent)
"""


def fork_case(tmp_path: Path, case: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", FORK_CASE, str(tmp_path / "flag"), case],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_fork_beside_runs_the_work_in_a_copy_while_meanwhile_runs(tmp_path: Path) -> None:
    """The copy's work finishes only once `meanwhile` has run here: both ran at once."""
    words = fork_case(tmp_path, "overlap").split()
    assert words[:1] + words[2:4] == ["copy", "saw", "meanwhile"], words
    assert words[1] != words[-1]  # the work ran in another process


def test_fork_beside_answers_none_when_the_copy_fails(tmp_path: Path) -> None:
    assert fork_case(tmp_path, "fails").split()[0] == "None"
    assert (tmp_path / "flag").exists()  # meanwhile ran all the same


def test_fork_beside_does_not_fork_beside_other_threads(tmp_path: Path) -> None:
    assert fork_case(tmp_path, "thread") == "None"
    assert not (tmp_path / "flag").exists()  # neither the work nor meanwhile ran
