"""Progress while a module .deb is unpacked (issue 13, goal 5): dpkg-deb prints none, so how far
its processes have read the .deb is read from /proc (`progress.file_position`, as `pv -d PID`
does) every `run(on_tick=)` tick, while dpkg-deb itself extracts the tree as it always did."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from qlimage import progress
from qlimage import run as qrun
from qlimage.errors import BuildError
from qlimage.image import stage
from qlimage.pool.packages import ModulePackage
from qlimage.site import load_site
from qlimage.trees import manifest, walk

from helpers import sh

pytestmark = [pytest.mark.tools]

# 50 files of 4 MB of hex text (half its bytes compress away): a 120 MB .deb at gzip -1 that
# dpkg-deb takes ~1.2 s here to unpack, reading it steadily (inflate, not the disk, sets the
# pace), so that many ticks see it part-way.
BLOB_FILES = 50
BLOB_BYTES = 4 << 20
PERCENT = re.compile(r"^qlimage: unpack blob_1\.0_all\.deb: +([0-9]+) % \((.*)\)$")


class SteppingClock:
    """A clock that moves 10 s per look: every update is due for a plain line in a log."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 10.0
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def write_blob_tree(root: Path) -> None:
    """The package tree: deterministic data files plus the entries whose metadata dpkg-deb must
    keep (owners, setuid, a private directory, a link, a hard-linked pair, an empty file)."""
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        "Package: blob\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: Test <test@example.org>\nDescription: progress test data\n"
    )
    data = root / "usr/share/blob"
    data.mkdir(parents=True)
    for i in range(BLOB_FILES):
        text = hashlib.shake_256(b"blob %d" % i).hexdigest(BLOB_BYTES // 2)
        (data / f"part{i:02d}").write_bytes(text.encode())
    tool = root / "usr/bin/tool"
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\necho tool\n")
    os.chown(tool, 0, 1234)
    os.chmod(tool, 0o4755)
    private = root / "var/lib/blob"
    private.mkdir(parents=True)
    os.chown(private, 4321, 1234)
    os.chmod(private, 0o750)
    (private / "state").write_bytes(b"")
    os.chown(private / "state", 4321, 1234)
    os.chmod(private / "state", 0o600)
    os.link(data / "part00", data / "part00.alias")
    (root / "usr/share/blob/latest").symlink_to("part49")


@pytest.fixture(scope="module")
def blob_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    top = tmp_path_factory.mktemp("blob")
    write_blob_tree(top / "tree")
    deb = top / "blob_1.0_all.deb"
    sh("dpkg-deb", "-Zgzip", "-z1", "--build", str(top / "tree"), str(deb))
    shutil.rmtree(top / "tree")
    return deb


def module_of(deb: Path) -> ModulePackage:
    return ModulePackage(package="blob", module="blob", flavor="bookworm", version="1.0", path=deb)


def shown_on(
    monkeypatch: pytest.MonkeyPatch, stream: io.StringIO, clock: Callable[[], float] | None = None
) -> None:
    """Every Progress the code makes writes to `stream` (a log unless it is a Terminal)."""
    monkeypatch.setattr(progress, "_silenced", False)
    made = functools.partial(progress.Progress, stream=stream, live=stream.isatty())
    if clock is not None:
        made = functools.partial(made, clock=clock)
    monkeypatch.setattr(progress, "Progress", made)


def hard_link_groups(root: Path) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for path in walk(root):
        st = path.lstat()
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            groups.setdefault(st.st_ino, []).append(path.relative_to(root).as_posix())
    return sorted(groups.values())


def test_file_position_reads_the_offset_of_an_open_file(tmp_path: Path) -> None:
    data, other = tmp_path / "data", tmp_path / "other"
    data.write_bytes(bytes(10_000))
    other.write_bytes(b"x")
    st = os.stat(data)
    with data.open("rb", buffering=0) as f, other.open("rb"):  # unbuffered: no read-ahead
        f.seek(1234)
        assert progress.file_position(os.getpid(), st.st_dev, st.st_ino) == 1234
        f.read(1000)
        assert progress.file_position(os.getpid(), st.st_dev, st.st_ino) == 2234
        never_opened = os.stat(tmp_path)  # same device, another inode
        assert progress.file_position(os.getpid(), never_opened.st_dev, never_opened.st_ino) is None
    assert progress.file_position(os.getpid(), st.st_dev, st.st_ino) is None  # closed
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert progress.file_position(gone.pid, st.st_dev, st.st_ino) is None  # reaped


def test_run_ticks_while_the_command_runs_and_keeps_its_output() -> None:
    ticks: list[float] = []
    started = time.monotonic()
    proc = qrun.run(
        ["sh", "-c", "cat; sleep 0.8; echo broken >&2; exit 3"],
        input=b"in and out\n",
        capture=True,
        check=False,
        on_tick=lambda p: ticks.append(time.monotonic() - started),
    )
    assert proc.stdout == b"in and out\n" and proc.stderr == b"broken\n"
    assert proc.returncode == 3
    assert len(ticks) >= 3 and ticks[-1] < 1.5, ticks
    with pytest.raises(BuildError, match=r"^sh failed with status 3: broken"):
        qrun.run(["sh", "-c", "sleep 0.3; echo broken >&2; exit 3"], on_tick=lambda p: None)


def test_run_stops_the_command_when_a_tick_fails() -> None:
    seen: list[int] = []

    def tick(proc: subprocess.Popen[bytes]) -> None:
        seen.append(proc.pid)
        raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        qrun.run(["sleep", "30"], on_tick=tick)
    assert time.monotonic() - started < 5
    assert not qrun.group_alive(seen[0])


def test_unpack_shows_how_far_dpkg_deb_has_read_and_unpacks_as_it_does(
    blob_deb: Path,
    site_factory: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    site = load_site(site_factory())
    log = io.StringIO()
    shown_on(monkeypatch, log, SteppingClock())
    tree = stage.unpack_module(site, module_of(blob_deb))
    lines = log.getvalue().splitlines()
    matches = [PERCENT.match(line) for line in lines]
    assert all(matches), lines
    percents = [int(m[1]) for m in matches if m]
    amounts = [m[2] for m in matches if m]
    size = progress.human_bytes(blob_deb.stat().st_size)
    assert percents[-1] == 100 and amounts[-1] == f"{size} of {size}", lines
    between = [p for p in percents if 0 < p < 100]
    assert len(set(between)) >= 3, lines  # seen part-way, several times
    assert percents == sorted(percents), lines  # never backwards

    plain = tmp_path / "plain"
    sh("dpkg-deb", "-x", str(blob_deb), str(plain))
    assert manifest(tree) == manifest(plain)
    assert (
        hard_link_groups(tree)
        == hard_link_groups(plain)
        == [["usr/share/blob/part00", "usr/share/blob/part00.alias"]]
    )
    assert (tree / "usr/bin/tool").stat().st_mode & 0o7777 == 0o4755  # the manifest saw it too


def test_a_failed_unpack_ends_its_line_short_of_100_percent(
    blob_deb: Path, site_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = blob_deb.parent / "broken" / blob_deb.name
    broken.parent.mkdir(exist_ok=True)
    with blob_deb.open("rb") as src, broken.open("wb") as dst:
        dst.write(src.read(blob_deb.stat().st_size * 2 // 3))  # cut inside data.tar
    site = load_site(site_factory())
    terminal = Terminal()
    shown_on(monkeypatch, terminal)
    with pytest.raises(BuildError, match=r"^dpkg-deb failed with status"):
        stage.unpack_module(site, module_of(broken))
    text = terminal.getvalue()
    assert text.startswith("\r\033[Kqlimage: unpack blob_1.0_all.deb: "), text
    assert text.endswith(")\n") and text.count("\n") == 1, text  # the error gets its own line
    assert "100 %" not in text
    assert not stage.module_tree_dir(site, module_of(broken)).exists()


def test_quiet_unpack_shows_nothing_and_looks_at_nothing(
    blob_deb: Path, site_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    site = load_site(site_factory())
    terminal = Terminal()
    shown_on(monkeypatch, terminal)
    looked: list[int] = []
    family = progress.process_family
    monkeypatch.setattr(progress, "process_family", lambda pid: looked.append(pid) or family(pid))
    progress.silence()
    tree = stage.unpack_module(site, module_of(blob_deb))
    assert terminal.getvalue() == ""
    assert looked == []
    assert (tree / "usr/share/blob/part49").stat().st_size == BLOB_BYTES
