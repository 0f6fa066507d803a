"""Progress of long work (`qlimage.progress`): a live line on a terminal, periodic plain lines
in a log, nothing with --quiet; mksquashfs' own progress bar read through `run(on_stdout=)`;
mmdebstrap's verbose lines read into a chroot's download and install lines."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import pytest

from qlimage import progress
from qlimage.image import squashfs
from qlimage.progress import MmdebstrapLog, Progress, SquashfsBar
from qlimage.run import run


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_gets_a_plain_line_every_ten_percent_after_a_moment() -> None:
    out, clock = io.StringIO(), Clock()
    shown = Progress("mksquashfs demo.img", 1000, stream=out, clock=clock)
    shown.update(500)  # at once: short work stays silent
    assert out.getvalue() == ""
    clock.now = 3.0
    for done in range(500, 1001, 10):
        shown.update(done)
    shown.finish()
    lines = out.getvalue().splitlines()
    assert lines[0] == "qlimage: mksquashfs demo.img:  50 % (500/1000)"
    assert lines[-1] == "qlimage: mksquashfs demo.img: 100 % (1000/1000)"
    assert len(lines) == 6  # 50, 60, 70, 80, 90, 100 %


def test_log_gets_a_line_every_five_seconds_when_slow() -> None:
    out, clock = io.StringIO(), Clock()
    shown = Progress("download", 10_000_000, as_bytes=True, stream=out, clock=clock)
    for second in range(3, 20):
        clock.now = float(second)
        shown.update(second * 1000, "package 1 of 2")
    lines = out.getvalue().splitlines()
    assert lines[0] == "qlimage: download:   0 % (3.0 kB of 10.0 MB, package 1 of 2)"
    assert len(lines) == 4  # at 3, 8, 13 and 18 s


def test_terminal_gets_one_live_line() -> None:
    out, clock = Terminal(), Clock()
    shown = Progress("mksquashfs demo.img", 4, stream=out, clock=clock)
    for done in range(5):
        clock.now += 1
        shown.update(done)
    shown.finish()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("100 % (4/4)\n")
    assert text.count("\r\033[K") == 6


def test_quiet_shows_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "_silenced", False)
    progress.silence()
    out, clock = Terminal(), Clock()
    shown = Progress("mksquashfs demo.img", 4, stream=out, clock=clock)
    clock.now = 10
    shown.update(2)
    shown.finish()
    assert out.getvalue() == ""


@pytest.mark.tools
def test_mksquashfs_progress_bar_is_read_as_it_comes(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for i in range(200):
        (tree / f"d{i % 7}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i % 7}/f{i}").write_bytes(bytes([i]) * 4096 * (i % 5 + 1))
    seen: list[tuple[float, float]] = []

    class Recorder(Progress):
        def update(self, done: float, extra: str = "") -> None:
            seen.append((done, self.total))
            super().update(done, extra)

    bar = SquashfsBar(Recorder("mksquashfs t.img", 0, stream=io.StringIO()))
    cmd = squashfs.mksquashfs_command(
        tree,
        tmp_path / "t.img",
        compressor="gzip",
        level=None,
        block_size=131072,
        epoch=0,
        progress=True,
    )
    run(cmd, on_stdout=bar.feed, unset=["SOURCE_DATE_EPOCH"])
    assert seen, "no progress read from mksquashfs"
    done, total = seen[-1]
    assert total > 0 and done == total
    assert (tmp_path / "t.img").stat().st_size > 0


def test_run_streams_stdout_and_keeps_stderr_for_the_error() -> None:
    chunks: list[bytes] = []
    proc = run(
        ["sh", "-c", "printf 'a\\rb\\r'; echo oops >&2; exit 3"],
        on_stdout=chunks.append,
        check=False,
    )
    assert b"".join(chunks) == b"a\rb\r"
    assert proc.returncode == 3 and proc.stderr == b"oops\n"


# --- mmdebstrap --verbose: a chroot's download and installs -----------------------------------

# Lines of a real `qlimage chroot create base --task tools` (mmdebstrap 1.3.5, bookworm, part of
# the .debs already in the cache), cut down: the index download, the first apt call's counts and
# its first fetches, the essential install's first and last dpkg lines, the `hello` install.
DEBIAN = "http://deb.debian.org/debian"
MMDEBSTRAP_VERBOSE = f"""\
I: running apt-get update...
Get:1 {DEBIAN} bookworm InRelease [151 kB]
Get:2 {DEBIAN} bookworm/main amd64 Packages [8790 kB]
Fetched 8941 kB in 1s (9132 kB/s)
I: downloading packages with apt...
0 upgraded, 4 newly installed, 0 to remove and 0 not upgraded.
Need to get 1376 kB/29.7 MB of archives.
After this operation, 139 MB of additional disk space will be used.
Get:1 {DEBIAN} bookworm/main amd64 liblzma5 amd64 5.4.1-1+deb12u1 [206 kB]
Get:2 {DEBIAN} bookworm/main amd64 libzstd1 amd64 1.5.4+dfsg2-5 [290 kB]
Get:3 {DEBIAN} bookworm/main amd64 libpcre2-8-0 amd64 10.42-1 [261 kB]
Get:4 {DEBIAN} bookworm/main amd64 libpam0g amd64 1.5.2-6+deb12u2 [92.1 kB]
Get:5 {DEBIAN} bookworm/main amd64 libpam-modules-bin amd64 1.5.2-6+deb12u2 [75.7 kB]
Get:6 {DEBIAN} bookworm/main amd64 libpam-modules amd64 1.5.2-6+deb12u2 [291 kB]
Get:7 {DEBIAN} bookworm/main amd64 libpam-runtime all 1.5.2-6+deb12u2 [161 kB]
/usr/bin/dpkg --status-fd 8 --configure --pending
Fetched 1376 kB in 0s (166 MB/s)
I: extracting archives...
I: installing essential packages...
Selecting previously unselected package gcc-12-base:amd64.
(Reading database ... 0 files and directories currently installed.)
Preparing to unpack .../gcc-12-base_12.2.0-14+deb12u1_amd64.deb ...
Unpacking gcc-12-base:amd64 (12.2.0-14+deb12u1) ...
Selecting previously unselected package libc6:amd64.
Preparing to unpack .../libc6_2.36-9+deb12u14_amd64.deb ...
Unpacking libc6:amd64 (2.36-9+deb12u14) ...
Unpacking mawk (1.3.4.20200120-3.1) ...
Unpacking base-files (12.4+deb12u15) ...
Setting up usrmerge (37~deb12u1) ...
The system has been successfully converted.
Setting up init-system-helpers (1.65.2+deb12u1) ...
Setting up libc-bin (2.36-9+deb12u14) ...
Setting up sysvinit-utils (3.06-4) ...
I: skipping essential/unlink as requested
I: installing remaining packages inside the chroot...
0 upgraded, 1 newly installed, 0 to remove and 0 not upgraded.
Need to get 0 B/53.1 kB of archives.
After this operation, 284 kB of additional disk space will be used.
Selecting previously unselected package hello.
(Reading database ... 5786 files and directories currently installed.)
Preparing to unpack .../hello_2.10-3_amd64.deb ...
Unpacking hello (2.10-3) ...
Setting up hello (2.10-3) ...
I: cleaning package lists and apt cache...
I: success in 15.7997 seconds
"""


def feed_mmdebstrap(log: MmdebstrapLog, clock: Clock, text: str) -> None:
    """One line a second, in uneven chunks as a pipe delivers them."""
    for line in text.splitlines(keepends=True):
        clock.now += 1.0
        data = line.encode()
        log.feed(data[:7])
        log.feed(data[7:])


def test_mmdebstrap_lines_become_download_and_install_lines() -> None:
    out, clock = io.StringIO(), Clock()
    log = MmdebstrapLog("chroot base", make=functools.partial(Progress, stream=out, clock=clock))
    feed_mmdebstrap(log, clock, MMDEBSTRAP_VERBOSE)
    log.close(ok=True)
    assert out.getvalue().splitlines() == [
        # of the bytes apt needs to get (the index fetches before do not count), from 2 s on
        "qlimage: chroot base:  15 % (206.0 kB of 1.4 MB, 1 package fetched)",
        "qlimage: chroot base:  36 % (496.0 kB of 1.4 MB, 2 packages fetched)",
        "qlimage: chroot base:  55 % (757.0 kB of 1.4 MB, 3 packages fetched)",
        "qlimage: chroot base:  67 % (924.8 kB of 1.4 MB, 5 packages fetched)",
        "qlimage: chroot base:  88 % (1.2 MB of 1.4 MB, 6 packages fetched)",
        "qlimage: chroot base: 100 % (1.4 MB of 1.4 MB, 7 packages fetched)",
        # the 4 packages apt announced, each unpacked and set up: 8 steps
        "qlimage: chroot base:  25 % (1/4, installing packages)",
        "qlimage: chroot base:  38 % (2/4, installing packages)",
        "qlimage: chroot base:  50 % (2/4, installing packages)",
        "qlimage: chroot base:  62 % (2/4, installing packages)",
        "qlimage: chroot base:  75 % (3/4, installing packages)",
        "qlimage: chroot base:  88 % (4/4, installing packages)",
        "qlimage: chroot base: 100 % (4/4, installing packages)",
        # hello: nothing to fetch (cached), its install lasted a second: short work is silent
    ]
    assert log.tail[-1] == "I: success in 15.7997 seconds"


def test_mmdebstrap_failure_ends_the_live_line_short() -> None:
    out, clock = Terminal(), Clock()
    log = MmdebstrapLog("chroot doomed", make=functools.partial(Progress, stream=out, clock=clock))
    cut = MMDEBSTRAP_VERBOSE.index(f"Get:3 {DEBIAN} bookworm/main")
    feed_mmdebstrap(log, clock, MMDEBSTRAP_VERBOSE[:cut] + "E: apt-get download failed")
    log.close(ok=False)
    text = out.getvalue()
    assert text.endswith(
        "\r\033[Kqlimage: chroot doomed:  36 % (496.0 kB of 1.4 MB, 2 packages fetched)\n"
    )
    assert "100 %" not in text
    assert list(log.tail)[-2:] == [
        f"Get:2 {DEBIAN} bookworm/main amd64 libzstd1 amd64 1.5.4+dfsg2-5 [290 kB]",
        "E: apt-get download failed",
    ]


def test_quiet_mmdebstrap_shows_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "_silenced", True)
    out, clock = Terminal(), Clock()
    log = MmdebstrapLog("chroot base", make=functools.partial(Progress, stream=out, clock=clock))
    feed_mmdebstrap(log, clock, MMDEBSTRAP_VERBOSE)
    log.close(ok=True)
    assert out.getvalue() == "" and log.tail[-1] == "I: success in 15.7997 seconds"
