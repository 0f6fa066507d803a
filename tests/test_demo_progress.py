"""Progress in a real `qlimage build` of the demo site (the repository's own site files): a live
line on a terminal, plain lines in a log, nothing with --quiet.

The build runs its work as doit tasks, and doit keeps a task's standard output to itself; these
tests read what reaches the process's terminal and its log, where an admin and CI see it.
"""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers import QLIMAGE, REPO, clone_built_site, qlimage

pytestmark = [pytest.mark.tools, pytest.mark.network]

DEMO_PARTS = ("site.toml", "images.d", "modules", "nodes.d", "overlays", "rootfs")
WAIT = 600.0  # seconds a build may take at most
LIVE = "\r\033[K"
# A log shows a piece of work only once it has lasted PLAIN_AFTER (2 s): xz packs the demo
# image in about 4 s on 2 cores (zstd in under one), so the log has a line to show.
SLOW_COMPRESSOR = 'compressor = "xz"'


def run_on_terminal(*args: str) -> tuple[int, str, str]:
    """`qlimage ARGS` with standard error on a pseudo-terminal and standard output on a pipe
    (a terminal whose output is also logged): (status, stdout, what the terminal showed)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TERM", None)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [*QLIMAGE, *args], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=terminal,
    )  # fmt: skip
    os.close(terminal)
    assert proc.stdout is not None
    piped = proc.stdout.fileno()
    streams = {controller: b"", piped: b""}
    open_fds = set(streams)
    deadline = time.monotonic() + WAIT
    try:
        while open_fds:
            left = deadline - time.monotonic()
            assert left > 0, f"qlimage {' '.join(args)} ran for more than {WAIT} s"
            ready, _, _ = select.select(list(open_fds), [], [], left)
            for fd in ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the terminal's last writer closed it
                    chunk = b""
                if chunk:
                    streams[fd] += chunk
                else:
                    open_fds.discard(fd)
        status = proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        os.close(controller)
    return status, streams[piped].decode(), streams[controller].decode()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A copy of the demo site built once on a terminal: (site, its stdout, its terminal)."""
    root = tmp_path_factory.mktemp("demo") / "site"
    root.mkdir()
    for part in DEMO_PARTS:
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, root / part, symlinks=True)
        else:
            shutil.copy2(src, root / part)
    status, out, shown = run_on_terminal("-C", str(root), "build")
    assert status == 0, out + shown
    return root, out, shown


def slow_copy(demo: tuple[Path, str, str], dest: Path) -> Path:
    """A private copy of the built demo whose image is packed with xz (a rebuild runs its
    image step alone, for longer than a log's first line waits)."""
    site = clone_built_site(demo[0], dest)
    toml = site / "site.toml"
    text, n = re.subn(r'(?m)^compressor = "zstd".*$', SLOW_COMPRESSOR, toml.read_text())
    assert n == 1, "the demo's site.toml names its compressor on one line"
    toml.write_text(text)
    return site


def live_lines(shown: str, label: str) -> list[str]:
    """The states the terminal's live line took for `label`, in order."""
    pattern = re.compile(rf"qlimage: {re.escape(label)}: +([0-9]+) % \(([^)]*)\)")
    return [m.group(0) for piece in shown.split(LIVE) if (m := pattern.match(piece))]


def test_a_terminal_shows_live_lines_of_the_demo_build(demo: tuple[Path, str, str]) -> None:
    _, out, shown = demo
    for label in (
        r"unpack linux-image-",  # the kernel package
        r"unpack qlustar-module-core-bookworm_",  # the core module
        r"mksquashfs demo.img",
    ):
        pattern = re.compile(rf"{re.escape(LIVE)}qlimage: ({label}\S*): +[0-9]+ % ")
        found = pattern.search(shown)
        assert found, f"no live line for {label}: {shown!r}"
        states = live_lines(shown, found.group(1))
        assert states and re.search(r" 100 % \(", states[-1]), states
    # each live line ends on a line of its own, at 100 %: the next output starts clean
    assert re.search(r"qlimage: mksquashfs demo\.img: 100 % \((\d+)/\1\)\r?\n", shown), shown
    assert "qlimage:" not in out, out  # on a terminal the log has doit's task lines only
    assert re.search(r"(?m)^\.  squashfs:demo$", out), out


def test_a_log_gets_plain_lines_of_the_image_step(
    demo: tuple[Path, str, str], tmp_path: Path
) -> None:
    site = slow_copy(demo, tmp_path / "site")
    proc = qlimage("-C", str(site), "build")
    lines = proc.stdout.splitlines()
    assert ".  squashfs:demo" in lines, proc.stdout
    after = lines[lines.index(".  squashfs:demo") + 1 :]
    shown = [line for line in after if line.startswith("qlimage: mksquashfs demo.img:")]
    assert shown, proc.stdout
    for line in shown:
        assert re.fullmatch(r"qlimage: mksquashfs demo\.img: +[0-9]+ % \([0-9]+/[0-9]+\)", line)
    assert re.fullmatch(r"qlimage: mksquashfs demo\.img: 100 % \((\d+)/\1\)", shown[-1]), shown
    assert "\r" not in proc.stdout and "\033" not in proc.stdout, proc.stdout
    assert proc.stderr == "", proc.stderr  # standard error stays for errors


def test_quiet_shows_no_progress_anywhere(demo: tuple[Path, str, str], tmp_path: Path) -> None:
    site = slow_copy(demo, tmp_path / "site")
    status, out, shown = run_on_terminal("-C", str(site), "build", "--quiet")
    assert status == 0, out + shown
    assert "qlimage:" not in shown and "qlimage:" not in out, (out, shown)
    assert (site / "bootfiles/qlustar/images/demo/current/demo.img").is_file()
    piped = slow_copy(demo, tmp_path / "piped")
    proc = qlimage("-C", str(piped), "build", "--quiet")
    assert "qlimage:" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
