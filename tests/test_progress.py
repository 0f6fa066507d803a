"""Progress of long work (`qlimage.progress`): a live line on a terminal, periodic plain lines
in a log, nothing with --quiet; mksquashfs' own progress bar read through `run(on_stdout=)`."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from qlimage import progress
from qlimage.image import squashfs
from qlimage.progress import Progress, SquashfsBar
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
