"""The initrd: module load order from modules.dep, reproducible cpio archives, the whole initrd."""

from __future__ import annotations

import gzip
import lzma
import os
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from qlimage.errors import BuildError, QlimageError
from qlimage.image import initrd
from qlimage.trees import walk

EPOCH = 1700000000
BUSYBOX = Path("/bin/busybox")
KVER = "6.1.0-99-amd64"

pytestmark = pytest.mark.tools


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@dataclass(frozen=True)
class Entry:
    mode: int
    uid: int
    gid: int
    mtime: int
    data: bytes


def read_newc(archive: bytes) -> list[tuple[str, Entry]]:
    """The members of an uncompressed newc cpio archive, in archive order."""
    out: list[tuple[str, Entry]] = []
    pos = 0
    while True:
        header = archive[pos : pos + 110]
        assert header[:6] == b"070701", f"bad newc magic at {pos}"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, uid, gid, mtime, size, namesize = (fields[i] for i in (1, 2, 3, 5, 6, 11))
        name_at = pos + 110
        name = archive[name_at : name_at + namesize - 1].decode()
        data_at = (name_at + namesize + 3) & ~3
        data = archive[data_at : data_at + size]
        pos = (data_at + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out.append((name, Entry(mode, uid, gid, mtime, data)))


def members(path: Path) -> dict[str, Entry]:
    return dict(read_newc(gzip.decompress(path.read_bytes())))


def cpio_list(path: Path, *options: str) -> list[str]:
    proc = subprocess.run(
        ["cpio", "-t", "--quiet", *options],
        input=gzip.decompress(path.read_bytes()),
        capture_output=True,
        check=True,
    )
    return proc.stdout.decode().splitlines()


# --- module load order ----------------------------------------------------------------------

MODULES_DEP = """\
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/lib/crc-t10dif.ko.xz: kernel/crypto/crct10dif_common.ko
kernel/crypto/crct10dif_common.ko:
kernel/fs/squashfs/squashfs.ko:
"""

MODULES_BUILTIN = """\
kernel/drivers/block/loop.ko
kernel/fs/overlayfs/overlay.ko
kernel/crypto/crc32c_generic.ko
"""


@pytest.fixture
def modules_dir(tmp_path: Path) -> Path:
    """A kernel modules directory: modules.dep, modules.builtin and tiny fake modules."""
    d = tmp_path / "lib/modules" / KVER
    d.mkdir(parents=True)
    (d / "modules.dep").write_text(MODULES_DEP)
    (d / "modules.builtin").write_text(MODULES_BUILTIN)
    for line in MODULES_DEP.splitlines():
        rel = line.split(":")[0]
        path = d / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        content = f"fake module {Path(rel).name.split('.ko')[0]}\n".encode()
        path.write_bytes(lzma.compress(content) if rel.endswith(".xz") else content)
    return d


def test_dependencies_come_first_each_once(modules_dir: Path) -> None:
    order = initrd.module_load_order(modules_dir, ["virtio_net", "net_failover", "squashfs"])
    assert order == [
        "kernel/net/core/failover.ko",
        "kernel/drivers/net/net_failover.ko",
        "kernel/drivers/net/virtio_net.ko",
        "kernel/fs/squashfs/squashfs.ko",
    ]


def test_dependency_asked_for_before_its_dependant(modules_dir: Path) -> None:
    order = initrd.module_load_order(modules_dir, ["failover", "virtio_net"])
    assert order == [
        "kernel/net/core/failover.ko",
        "kernel/drivers/net/net_failover.ko",
        "kernel/drivers/net/virtio_net.ko",
    ]


def test_builtin_modules_are_skipped(modules_dir: Path) -> None:
    order = initrd.module_load_order(
        modules_dir, ["loop", "virtio_pci", "overlay", "crc32c-generic"]
    )
    assert order == [
        "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
        "kernel/drivers/virtio/virtio_pci.ko",
    ]


def test_dash_and_underscore_are_the_same(modules_dir: Path) -> None:
    expected = ["kernel/crypto/crct10dif_common.ko", "kernel/lib/crc-t10dif.ko.xz"]
    assert initrd.module_load_order(modules_dir, ["crc_t10dif"]) == expected
    assert initrd.module_load_order(modules_dir, ["crc-t10dif"]) == expected
    assert initrd.module_load_order(modules_dir, ["crc-t10dif", "crc_t10dif"]) == expected
    assert initrd.module_load_order(modules_dir, ["virtio-net"])[-1].endswith("/virtio_net.ko")


def test_unknown_module_is_a_build_error(modules_dir: Path) -> None:
    with pytest.raises(BuildError) as excinfo:
        initrd.module_load_order(modules_dir, ["squashfs", "e1000e"])
    assert isinstance(excinfo.value, QlimageError)
    assert "'e1000e'" in str(excinfo.value)
    assert f"{modules_dir}/modules.dep" in str(excinfo.value)
    assert "initrd.modules" in str(excinfo.value)  # the hint names the setting


def test_no_modules_wanted(modules_dir: Path) -> None:
    assert initrd.module_load_order(modules_dir, []) == []


def test_module_name() -> None:
    assert initrd.module_name("kernel/lib/crc-t10dif.ko.xz") == "crc_t10dif"
    assert initrd.module_name("kernel/fs/squashfs/squashfs.ko") == "squashfs"


# --- make_cpio ------------------------------------------------------------------------------

TREE: list[tuple[str, str, int]] = [  # (path, kind or content, mode), parents first
    ("a", "dir", 0o755),
    ("a/x", "x data\n", 0o644),
    ("a-b", "a-b data\n", 0o600),
    ("bin", "dir", 0o755),
    ("bin/tool", "#!/bin/sh\n", 0o755),
    ("bin/link", "->tool", 0),
    ("empty", "dir", 0o700),
    ("tmp", "dir", 0o1777),
    ("z", "z\n", 0o644),
]


def make_tree(root: Path, *, reverse: bool, mtime: int, owner: int = 0) -> Path:
    """TREE below root, created in the given order, every mtime set to `mtime`."""
    root.mkdir(parents=True)
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
        path = root / rel
        if not what.startswith("->"):
            os.chmod(path, mode)  # modes are content: set them, the umask must not decide
        if owner and os.geteuid() == 0:
            os.lchown(path, owner, owner)
        os.utime(path, (mtime, mtime), follow_symlinks=False)
    return root


def test_make_cpio_is_reproducible(tmp_path: Path) -> None:
    with umask(0o022):
        make_tree(tmp_path / "t1", reverse=False, mtime=EPOCH + 10)
        initrd.make_cpio(tmp_path / "t1", tmp_path / "one.cpio.gz", EPOCH)
    with umask(0o077):
        make_tree(tmp_path / "t2", reverse=True, mtime=EPOCH + 99999, owner=1234)
        initrd.make_cpio(tmp_path / "t2", tmp_path / "out/two.cpio.gz", EPOCH)
    one, two = tmp_path / "one.cpio.gz", tmp_path / "out/two.cpio.gz"
    assert one.read_bytes() == two.read_bytes()
    assert one.stat().st_mode & 0o777 == two.stat().st_mode & 0o777 == 0o644


def test_make_cpio_names_owners_modes_and_times(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree", reverse=True, mtime=EPOCH + 500, owner=1234)
    out = tmp_path / "tree.cpio.gz"
    initrd.make_cpio(root, out, EPOCH)

    expected_names = [p.relative_to(root).as_posix() for p in walk(root)]
    assert expected_names == ["a", "a/x", "a-b", "bin", "bin/link", "bin/tool", "empty", "tmp", "z"]
    assert cpio_list(out) == expected_names

    listing = cpio_list(out, "-v", "--numeric-uid-gid")
    assert len(listing) == len(expected_names)
    for line in listing:
        fields = line.split()
        assert (fields[2], fields[3]) == ("0", "0"), line

    entries = members(out)
    assert list(entries) == expected_names
    for rel, what, mode in TREE:
        e = entries[rel]
        assert (e.uid, e.gid, e.mtime) == (0, 0, EPOCH), rel
        if what == "dir":
            assert e.mode == stat.S_IFDIR | mode, rel
        elif what.startswith("->"):
            assert stat.S_ISLNK(e.mode) and e.data == what[2:].encode(), rel
        else:
            assert e.mode == stat.S_IFREG | mode and e.data == what.encode(), rel


def test_make_cpio_keeps_older_mtimes(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree", reverse=False, mtime=EPOCH - 3600)
    initrd.make_cpio(root, tmp_path / "out.cpio.gz", EPOCH)
    assert {e.mtime for e in members(tmp_path / "out.cpio.gz").values()} == {EPOCH - 3600}


def test_make_cpio_gzip_header_has_no_name_or_time(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree", reverse=False, mtime=EPOCH)
    initrd.make_cpio(root, tmp_path / "out.cpio.gz", EPOCH)
    header = (tmp_path / "out.cpio.gz").read_bytes()[:10]
    assert header[:3] == b"\x1f\x8b\x08"
    assert header[3] & 0x08 == 0  # FNAME flag unset
    assert header[4:8] == b"\0\0\0\0"  # MTIME zero


# --- build_initrd ---------------------------------------------------------------------------

WANTED = ["virtio_net", "virtio-pci", "crc_t10dif", "squashfs", "loop", "overlay"]
LOAD_ORDER = [
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/crypto/crct10dif_common.ko",
    "kernel/lib/crc-t10dif.ko",  # decompressed from .ko.xz
    "kernel/fs/squashfs/squashfs.ko",
]


def build(output: Path, modules_dir: Path, mask: int) -> Path:
    with umask(mask):
        initrd.build_initrd(
            output,
            busybox=BUSYBOX,
            kernel_modules=modules_dir,
            kver=KVER,
            modules=WANTED,
            epoch=EPOCH,
        )
    return output


@pytest.fixture
def busybox() -> Path:
    if not BUSYBOX.is_file():
        pytest.fail(f"{BUSYBOX} is not installed (apt-get install busybox; scripts/setup.sh does)")
    return BUSYBOX


@pytest.mark.usefixtures("busybox")
def test_build_initrd_contents(tmp_path: Path, modules_dir: Path) -> None:
    out = build(tmp_path / "boot/initrd.img", modules_dir, 0o022)
    entries = members(out)

    init = entries["init"]
    assert stat.S_ISREG(init.mode) and stat.S_IMODE(init.mode) == 0o755
    assert init.data == initrd.data_file("init")
    script = entries["etc/qlustar/udhcpc.script"]
    assert stat.S_IMODE(script.mode) == 0o755
    assert script.data == initrd.data_file("udhcpc.script")

    bb = entries["bin/busybox"]
    assert stat.S_IMODE(bb.mode) == 0o755
    assert bb.data == BUSYBOX.read_bytes()
    for applet in initrd.APPLETS:
        link = entries[f"bin/{applet}"]
        assert stat.S_ISLNK(link.mode) and link.data == b"busybox", applet

    assert entries["tmp"].mode == stat.S_IFDIR | 0o1777
    for d in ("dev", "proc", "sys", "run", "newroot", "union", "sbin"):
        assert entries[d].mode == stat.S_IFDIR | 0o755, d

    order = entries["etc/qlustar/modules.order"]
    assert order.data.decode().splitlines() == LOAD_ORDER
    assert stat.S_IMODE(order.mode) == 0o644
    for rel in LOAD_ORDER:
        module = entries[f"lib/modules/{KVER}/{rel}"]
        name = Path(rel).name.removesuffix(".ko")
        assert module.data == f"fake module {name}\n".encode(), rel
        assert stat.S_IMODE(module.mode) == 0o644, rel
    assert not any(name.endswith(".xz") for name in entries)
    assert not any("loop" in name or "overlay" in name for name in entries)  # builtin

    assert all((e.uid, e.gid) == (0, 0) for e in entries.values())
    assert all(e.mtime <= EPOCH for e in entries.values())
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert os.listdir(out.parent) == ["initrd.img"]  # no temporary tree left behind


@pytest.mark.usefixtures("busybox")
def test_build_initrd_is_reproducible_across_umasks(tmp_path: Path, modules_dir: Path) -> None:
    one = build(tmp_path / "one/initrd.img", modules_dir, 0o022)
    two = build(tmp_path / "two/initrd.img", modules_dir, 0o077)
    three = build(tmp_path / "three/initrd.img", modules_dir, 0o002)
    assert one.read_bytes() == two.read_bytes() == three.read_bytes()


@pytest.mark.usefixtures("busybox")
def test_build_initrd_with_unknown_module_leaves_no_output(
    tmp_path: Path, modules_dir: Path
) -> None:
    out = tmp_path / "boot/initrd.img"
    out.parent.mkdir()
    out.write_bytes(b"old initrd")
    with pytest.raises(BuildError):
        initrd.build_initrd(
            out,
            busybox=BUSYBOX,
            kernel_modules=modules_dir,
            kver=KVER,
            modules=["no_such_module"],
            epoch=EPOCH,
        )
    assert out.read_bytes() == b"old initrd"
    assert os.listdir(out.parent) == ["initrd.img"]


@pytest.mark.usefixtures("busybox")
def test_build_initrd_extra_files_are_reproducible_across_umasks(
    tmp_path: Path, modules_dir: Path
) -> None:
    outs = []
    for i, mask in enumerate((0o022, 0o002)):
        out = tmp_path / str(i) / "initrd.img"
        with umask(mask):
            initrd.build_initrd(
                out,
                busybox=BUSYBOX,
                kernel_modules=modules_dir,
                kver=KVER,
                modules=[],
                epoch=EPOCH,
                extra={"etc/site/site.conf": b"x=1\n"},
            )
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
