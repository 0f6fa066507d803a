"""Reproducible squashfs images: same tree, same bytes; every compressor; failures write nothing."""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from qlimage.errors import BuildError, QlimageError
from qlimage.image import squashfs
from qlimage.image.squashfs import EarlyWriteback, make_squashfs, mksquashfs_command
from qlimage.run import run

pytestmark = pytest.mark.tools

EPOCH = 1700000000
# (path, content or "dir" or "->target", mode): modes are content, so the test sets them.
TREE: list[tuple[str, str, int]] = [
    ("bin", "dir", 0o755),
    ("bin/busybox", "#!/bin/sh\necho busybox\n", 0o755),
    ("bin/sh", "->busybox", 0),
    ("etc", "dir", 0o755),
    ("etc/hostname", "node\n", 0o644),
    ("etc/shadow", "root:*:19000:0:99999:7:::\n", 0o640),
    ("etc/big", "0123456789abcdef" * 20000, 0o644),  # more than one block
    ("tmp", "dir", 0o1777),
    ("var", "dir", 0o755),
    ("var/empty", "dir", 0o700),
]


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def make_tree(root: Path, *, reverse: bool = False, mtime: int = EPOCH) -> Path:
    root.mkdir(parents=True)
    os.chmod(root, 0o755)
    order = sorted(TREE, key=lambda e: e[0], reverse=reverse)
    for rel, what, _mode in sorted(order, key=lambda e: e[0].count("/")):  # parents first
        path = root / rel
        if what == "dir":
            path.mkdir()
        elif what.startswith("->"):
            os.symlink(what[2:], path)
        else:
            path.write_text(what)
    for rel, what, mode in TREE:
        if not what.startswith("->"):
            os.chmod(root / rel, mode)
        os.utime(root / rel, (mtime, mtime), follow_symlinks=False)
    os.utime(root, (mtime, mtime))
    return root


def unsquashfs(*args: str) -> str:
    proc = subprocess.run(
        ["unsquashfs", *args],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, TZ="UTC"),
    )
    return proc.stdout


def compression_of(image: Path) -> str:
    info = unsquashfs("-s", str(image))
    assert f"Found a valid SQUASHFS 4:0 superblock on {image}" in info, info
    return next(line.split()[1] for line in info.splitlines() if line.startswith("Compression "))


def test_same_content_gives_same_bytes(tmp_path: Path) -> None:
    with umask(0o022):
        one = make_tree(tmp_path / "one", mtime=EPOCH + 60)
        make_squashfs(one, tmp_path / "one.img", epoch=EPOCH)
    with umask(0o077):
        two = make_tree(tmp_path / "two", reverse=True, mtime=EPOCH + 86400 * 365)
        make_squashfs(two, tmp_path / "out/two.img", epoch=EPOCH)
    with umask(0o002):
        three = make_tree(tmp_path / "three", mtime=EPOCH - 86400)
        make_squashfs(three, tmp_path / "three.img", epoch=EPOCH)
    data = (tmp_path / "one.img").read_bytes()
    assert data == (tmp_path / "out/two.img").read_bytes() == (tmp_path / "three.img").read_bytes()
    for name in ("one.img", "out/two.img", "three.img"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644


def test_mode_change_changes_the_image(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    make_squashfs(tree, tmp_path / "a.img", epoch=EPOCH)
    os.chmod(tree / "etc/hostname", 0o600)
    make_squashfs(tree, tmp_path / "b.img", epoch=EPOCH)
    assert (tmp_path / "a.img").read_bytes() != (tmp_path / "b.img").read_bytes()


def test_listing_shows_every_file_at_the_epoch(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", mtime=EPOCH + 12345)
    image = tmp_path / "image.img"
    make_squashfs(tree, image, epoch=EPOCH)
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(EPOCH))
    listing = {}
    for line in unsquashfs("-lls", str(image)).splitlines():
        if not line.startswith(("d", "-", "l")):
            continue  # the header lines
        fields = line.split()
        mode, owner, date, clock, path = fields[0], fields[1], fields[3], fields[4], fields[5]
        assert f"{date} {clock}" == stamp, line
        assert owner == "root/root" or os.geteuid() != 0, line
        listing[path.removeprefix("squashfs-root").lstrip("/")] = mode
    assert listing == {
        "": "drwxr-xr-x",
        "bin": "drwxr-xr-x",
        "bin/busybox": "-rwxr-xr-x",
        "bin/sh": "lrwxrwxrwx",
        "etc": "drwxr-xr-x",
        "etc/big": "-rw-r--r--",
        "etc/hostname": "-rw-r--r--",
        "etc/shadow": "-rw-r-----",
        "tmp": "drwxrwxrwt",
        "var": "drwxr-xr-x",
        "var/empty": "drwx------",
    }
    assert time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(EPOCH)) in unsquashfs("-s", str(image))


@pytest.mark.parametrize(
    "compressor, level",
    [
        ("zstd", None),
        ("zstd", 19),
        ("gzip", None),
        ("gzip", 9),
        ("xz", None),
        ("xz", 6),
        ("lz4", 9),
        ("lzo", 5),
    ],
)
def test_compressors(tmp_path: Path, compressor: str, level: int | None) -> None:
    tree = make_tree(tmp_path / "tree")
    image = tmp_path / "image.img"
    make_squashfs(tree, image, compressor=compressor, level=level, block_size=65536, epoch=EPOCH)
    assert compression_of(image) == compressor
    assert "Block size 65536" in unsquashfs("-s", str(image))
    out = tmp_path / "extracted"
    unsquashfs("-no-progress", "-d", str(out), str(image))
    for rel, what, _mode in TREE:
        if what.startswith("->"):
            assert os.readlink(out / rel) == what[2:]
        elif what != "dir":
            assert (out / rel).read_text() == what, rel


def test_command_levels() -> None:
    def cmd(compressor: str, level: int | None) -> list[str]:
        return mksquashfs_command(
            Path("t"), Path("o"), compressor=compressor, level=level, block_size=4096, epoch=EPOCH
        )

    base = cmd("zstd", None)
    assert base[:3] == ["mksquashfs", "t", "o"]
    assert ["-mkfs-time", str(EPOCH)] == base[base.index("-mkfs-time") :][:2]
    assert ["-all-time", str(EPOCH)] == base[base.index("-all-time") :][:2]
    assert base[base.index("-comp") :][:2] == ["-comp", "zstd"]
    assert base[base.index("-b") :][:2] == ["-b", "4096"]
    assert "-noappend" in base
    assert cmd("zstd", 19)[len(base) :] == ["-Xcompression-level", "19"]
    assert cmd("gzip", 9)[len(base) :] == ["-Xcompression-level", "9"]
    assert cmd("xz", 6)[len(base) :] == []
    assert cmd("lz4", 9)[len(base) :] == ["-Xhc"]
    assert cmd("lz4", 1)[len(base) :] == []


def test_failing_mksquashfs_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "images/demo.img"
    with pytest.raises(BuildError) as excinfo:
        make_squashfs(tmp_path / "no-such-tree", out, epoch=EPOCH)
    assert isinstance(excinfo.value, QlimageError)
    assert "mksquashfs failed" in str(excinfo.value)
    assert not out.exists()
    assert os.listdir(out.parent) == []  # no temporary directory left behind


def test_failing_mksquashfs_keeps_the_old_image(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    out = tmp_path / "images/demo.img"
    make_squashfs(tree, out, epoch=EPOCH)
    good = out.read_bytes()
    inode = out.stat().st_ino
    with pytest.raises(QlimageError):
        make_squashfs(tmp_path / "no-such-tree", out, epoch=EPOCH)
    with pytest.raises(QlimageError):  # mksquashfs rejects the level: gzip knows 1..9 only
        make_squashfs(tree, out, compressor="gzip", level=15, epoch=EPOCH)
    assert out.read_bytes() == good
    assert out.stat().st_ino == inode
    assert os.listdir(out.parent) == ["demo.img"]


def test_rebuild_replaces_the_image(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    out = tmp_path / "demo.img"
    out.write_bytes(b"not a squashfs image")
    make_squashfs(tree, out, epoch=EPOCH)
    assert compression_of(out) == "zstd"


# Early writeback (issue 13): the image goes to disk while mksquashfs still makes it, so the fsync
# before the generation's rename finds little left to write. cachestat(2) (Linux 6.5) counts a
# file's dirty pages in the page cache.
CACHESTAT = 451  # x86_64 syscall number


class CacheStat(ctypes.Structure):
    _fields_ = [(f, ctypes.c_uint64) for f in ("cache", "dirty", "writeback", "evicted", "recent")]


def cache_stat(path: Path) -> CacheStat:
    libc = ctypes.CDLL(None, use_errno=True)
    span, result = (ctypes.c_uint64 * 2)(0, 0), CacheStat()  # offset 0, length 0: whole file
    fd = os.open(path, os.O_RDONLY)
    try:
        assert libc.syscall(CACHESTAT, fd, ctypes.byref(span), ctypes.byref(result), 0) == 0, (
            os.strerror(ctypes.get_errno())
        )
    finally:
        os.close(fd)
    return result


def written_unsynced(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))  # no fsync: the pages stay dirty until writeback
    return path


def test_early_writeback_starts_writing_without_waiting(tmp_path: Path) -> None:
    poked = written_unsynced(tmp_path / "poked", 16 << 20)
    control = written_unsynced(tmp_path / "control", 16 << 20)
    assert cache_stat(poked).dirty > 0 and cache_stat(control).dirty > 0
    writeback = EarlyWriteback(poked, every=0.0)
    writeback.poke()
    writeback.close()
    assert writeback.started == 1
    deadline = time.monotonic() + 20
    while cache_stat(poked).dirty and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache_stat(poked).dirty == 0
    # The kernel itself writes a file out only 30 s after it was dirtied (dirty_expire_centisecs)
    assert cache_stat(control).dirty > 0
    assert cache_stat(poked).cache == (16 << 20) // os.sysconf("SC_PAGE_SIZE")  # still cached


def test_early_writeback_waits_its_interval_and_for_the_file() -> None:
    now = [100.0]
    writeback = EarlyWriteback(Path("/nonexistent/image"), every=1.0, clock=lambda: now[0])
    writeback.poke()  # too early
    now[0] += 1.0
    writeback.poke()  # due, but mksquashfs has not created the file yet
    assert writeback.started == 0 and writeback.fd is None


def test_make_squashfs_leaves_little_to_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for n in range(8):  # incompressible: gzip takes a few seconds on two cores
        (tree / f"random{n}").write_bytes(os.urandom(6 << 20))
    raw = tmp_path / "raw.img"
    run(mksquashfs_command(tree, raw, compressor="gzip", level=9, block_size=131072, epoch=EPOCH))
    monkeypatch.setattr(squashfs, "WRITEBACK_EVERY", 0.0)  # on every progress update
    ours = tmp_path / "ours.img"
    make_squashfs(tree, ours, compressor="gzip", level=9, epoch=EPOCH)
    assert ours.read_bytes() == raw.read_bytes()
    pages = cache_stat(ours).cache
    assert cache_stat(raw).dirty > pages * 0.9  # without it, all of it is left for the fsync
    assert cache_stat(ours).dirty + cache_stat(ours).writeback < pages * 0.5
