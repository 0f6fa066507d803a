"""The node runner's disk step (qlimage/node/runner/disk.py) for real, on a loop device.

As root: a sparse image file in tmp_path is attached with `losetup --partscan`, and the step
partitions, formats, mounts and swaps on it with the real tools through the real subprocess
runner. Only the runner's paths are redirected (disk-config, fstab, mount points under
tmp_path). Whatever happens, the finalizer unmounts, swaps off and detaches the loop device.
The tools come from scripts/setup.sh (fdisk, e2fsprogs, xfsprogs, util-linux, mount).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qlimage.bundle.render import disk_field
from qlimage.node.runner import disk as node_disk
from qlimage.node.runner import paths as node_paths
from qlimage.node.runner.commands import run_command
from qlimage.node.runner.report import Reporter

pytestmark = pytest.mark.tools

TOOLS = (
    "losetup", "sfdisk", "partx", "blkid", "lsblk", "findmnt", "mkfs.ext4", "mkswap", "mount",
    "umount", "swapon", "swapoff", "mkfs.xfs",
)  # fmt: skip
HAS_XFS = shutil.which("mkfs.xfs") is not None
# Sparse, so its size costs nothing; 512 MiB rather than 256 because mkfs.xfs (xfsprogs 6)
# refuses file systems smaller than 300 MB, and the rest after 64 + 32 MiB must hold one.
IMAGE_MIB = 512


def needs() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop devices, mkfs, mount, swapon)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"needs {' '.join(missing)} (scripts/setup.sh installs them)"
    return None


def out(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def quiet(*argv: str) -> None:
    subprocess.run(argv, check=False, capture_output=True)


def mounts() -> list[tuple[str, str]]:
    """(source, target) of everything mounted, escapes decoded."""
    lines = Path("/proc/self/mounts").read_text().splitlines()
    return [
        (node_disk.fstab_unescape(f[0]), node_disk.fstab_unescape(f[1]))
        for f in (line.split() for line in lines)
    ]


def active_swaps() -> list[str]:
    return [line.split()[0] for line in Path("/proc/swaps").read_text().splitlines()[1:]]


def release(dev: str, below: Path) -> None:
    """Unmount what is mounted from `dev` or below `below`, and swap off `dev`'s partitions."""
    for source, target in sorted(mounts(), key=lambda m: -len(m[1])):
        if source.startswith(dev + "p") or target.startswith(f"{below}/"):
            quiet("umount", target)
    for swap in active_swaps():
        if swap.startswith(dev + "p"):
            quiet("swapoff", swap)


@pytest.fixture
def loop_disk(tmp_path: Path) -> Iterator[str]:
    reason = needs()
    if reason:
        pytest.fail(reason)  # the test command installs the tools: missing ones are a failure
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(IMAGE_MIB * 1024 * 1024)
    proc = subprocess.run(
        ["losetup", "--find", "--show", "--partscan", str(image)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.fail(f"cannot attach a loop device here: {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    try:
        yield dev
    finally:
        release(dev, tmp_path)
        quiet("partx", "-d", dev)
        quiet("losetup", "-d", dev)


def fs_and_label(device: str) -> list[str]:
    """TYPE and LABEL as blkid probes them on the device, checked against lsblk's view when
    udev runs (lsblk reads its database, and shows nothing without udev)."""
    probed = [out("blkid", "-p", "-o", "value", "-s", tag, device) for tag in ("TYPE", "LABEL")]
    probed = [value for value in probed if value]
    if Path("/run/udev/data").is_dir():
        assert out("lsblk", "-no", "FSTYPE,LABEL", device).split() == probed
    return probed


def uuid(device: str) -> str:
    return out("blkid", "-p", "-o", "value", "-s", "UUID", device)


def test_disk_step_on_a_loop_device(
    loop_disk: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dev = loop_disk
    p1, p2, p3 = (node_disk.partition_device(dev, n) for n in (1, 2, 3))
    assert p1 == f"{dev}p1"
    # A space in the mount points: escaped in disk-config, /proc/self/mounts and fstab.
    mnt = tmp_path / "mnt point"
    scratch, data = mnt / "scratch", mnt / "data"
    rest_fs = "xfs" if HAS_XFS else "ext4"
    config, fstab = tmp_path / "disk-config", tmp_path / "fstab"
    fstab.write_text("proc /proc proc defaults 0 0\n")
    monkeypatch.setattr(node_paths, "DISK_CONFIG_FILE", str(config))
    monkeypatch.setattr(node_paths, "FSTAB_FILE", str(fstab))

    def boot(wipe: str) -> tuple[tuple[int, int], str]:
        config.write_text(
            f"# the local disk of beo-01\ndevice={disk_field(dev)}\nlabel=gpt\nwipe={wipe}\n"
            f"part 1 64MiB ext4 {disk_field(str(scratch))} scratch -\n"
            "part 2 32MiB swap - - -\n"
            f"part 3 rest {rest_fs} {disk_field(str(data))} data noatime\n"
        )
        result = node_disk.initialize_disks(run_command, Reporter())
        return result, capsys.readouterr().out

    def check_mounted() -> None:
        assert out("findmnt", "-n", "-o", "SOURCE", "--mountpoint", str(scratch)) == p1
        assert out("findmnt", "-n", "-o", "SOURCE,FSTYPE", "--mountpoint", str(data)).split() == [
            p3,
            rest_fs,
        ]
        assert "noatime" in out("findmnt", "-n", "-o", "OPTIONS", "--mountpoint", str(data))
        assert p2 in active_swaps()
        escaped = node_disk.fstab_escape
        assert fstab.read_text() == (
            "proc /proc proc defaults 0 0\n"
            f"{p1} {escaped(str(scratch))} ext4 defaults 0 0 # qlustar-disk\n"
            f"{p2} none swap sw 0 0 # qlustar-disk\n"
            f"{p3} {escaped(str(data))} {rest_fs} noatime 0 0 # qlustar-disk\n"
        )

    # First boot: the disk is blank (no table, no signature), so it is partitioned.
    result, console = boot("if-unformatted")
    assert result == (1, 0), console
    assert f"qlustar: disk {dev}: partitioned (gpt, 3 partitions)" in console
    assert f"qlustar: disk {dev}: mounted {p1} on {scratch}" in console
    assert out("blkid", "-p", "-o", "value", "-s", "PTTYPE", dev) == "gpt"
    assert fs_and_label(p1) == ["ext4", "scratch"]
    assert fs_and_label(p2) == ["swap"]
    assert fs_and_label(p3) == [rest_fs, "data"]
    check_mounted()
    first_uuid = uuid(p1)
    (scratch / "kept").write_text("survives reboots\n")

    # Reboot: nothing mounted or swapped on any more; the disk has its table now.
    release(dev, tmp_path)
    assert not any(source.startswith(dev) for source, _ in mounts())
    result, console = boot("if-unformatted")
    assert result == (1, 0), console
    assert f"qlustar: disk {dev}: kept existing partitions (wipe=if-unformatted)" in console
    assert "partitioned" not in console
    assert uuid(p1) == first_uuid
    assert (scratch / "kept").read_text() == "survives reboots\n"
    check_mounted()

    # The step run again while everything is mounted: left as it is.
    result, console = boot("if-unformatted")
    assert result == (1, 0), console
    assert f"qlustar: disk {dev}: {p1} already mounted on {scratch}" in console
    assert f"qlustar: disk {dev}: swap on {p2} already active" in console
    check_mounted()

    # wipe=always while the disk is in use: sfdisk refuses, nothing is lost.
    result, console = boot("always")
    assert result == (1, 1), console
    assert f"qlustar: ERROR: disk {dev}: sfdisk failed" in console
    assert uuid(p1) == first_uuid
    assert (scratch / "kept").read_text() == "survives reboots\n"
