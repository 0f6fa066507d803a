"""The disk step: the local disk described by /etc/qlustar/options.d/disk-config."""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass

from . import names, paths
from .apply import write_file
from .commands import Runner, find_program, run_logged
from .report import Reporter, read_text

# Local disk (/etc/qlustar/options.d/disk-config, written by the head; format in its header)
#
# After the actions and before the init.d scripts (which may rely on the local file
# systems), the disk named by the file is set up:
#
#  * a missing file means no local disk is configured; a disk not on this node is skipped
#    with a warning (the same bundle may serve nodes with and without one);
#  * `wipe` decides whether it is (re)partitioned: `never` leaves the partition table alone;
#    `always` repartitions and formats at every boot; `if-unformatted` only when the disk
#    is blank: `sfdisk --dump` finds no partition table AND `blkid -p` finds no other
#    signature either (exit status 2). A disk holding e.g. a file system or RAID member on
#    the whole device is thus never taken for blank: that is an error, not a wipe;
#  * partitioning is `sfdisk --wipe always --wipe-partitions always <disk>` fed a script on
#    stdin. Without --no-reread, sfdisk refuses a disk that is in use (a partition mounted
#    or swapped on). `partx -u` then tells the kernel about the new partitions (sfdisk's
#    own re-read does not always, e.g. on loop devices), `udevadm settle` waits for udev,
#    and we wait up to PARTITION_WAIT seconds for each partition's device node;
#  * each partition gets its file system (mkfs.ext4 -F -q, mkfs.xfs -f, mkswap) only right
#    after partitioning; kept partitions are only mounted;
#  * partitions with a mount point are mounted (the directory is created), swap partitions
#    activated; what is mounted already is left as it is. /etc/fstab then gets one line for
#    each partition mounted or activated (so systemd keeps them; not for one that failed,
#    which systemd would only fail again), marked with FSTAB_MARK; the marked lines of an
#    earlier run are replaced, all other lines are kept;
#  * any error (bad file, missing tool, a command failing) is reported and the step counted
#    as failed; the boot goes on with the init.d scripts.
#
# Partition device nodes are named after the disk's real path (a /dev/disk/by-id/... link is
# resolved first): /dev/sdb -> /dev/sdb1, and with a "p" when the name ends in a digit:
# /dev/nvme0n1 -> /dev/nvme0n1p1, /dev/loop0 -> /dev/loop0p1, /dev/mmcblk0 -> /dev/mmcblk0p1.

FSTAB_MARK = "# qlustar-disk"
DISK_LABELS = ("gpt", "dos")
DISK_WIPE = ("never", "if-unformatted", "always")
DISK_FS = ("ext4", "xfs", "swap")
DEFAULT_DISK_LABEL = names.DEFAULT_DISK_LABEL  # as qlimage.bundle writes when the option has none
DEFAULT_DISK_WIPE = names.DEFAULT_DISK_WIPE
_SIZE = re.compile(r"^([0-9]+)(MiB|GiB|TiB)$")
_SIZE_MIB = {"MiB": 1, "GiB": 1024, "TiB": 1024 * 1024}
_LABEL_MAX = {"ext4": 16, "xfs": 12, "swap": 16}  # bytes, as mkfs.* / mkswap accept
_MKFS = {"ext4": "mkfs.ext4", "xfs": "mkfs.xfs", "swap": "mkswap"}
# Named in "not found" errors: the Debian package that has the program.
TOOL_PACKAGES = {
    "sfdisk": "fdisk",
    "blkid": "util-linux",
    "mkswap": "util-linux",
    "swapon": "mount",
    "mount": "mount",
    "mkfs.ext4": "e2fsprogs",
    "mkfs.xfs": "xfsprogs",
}


class DiskError(Exception):
    """The disk step cannot go on (bad disk-config, missing tool, a command failed)."""


@dataclass(frozen=True)
class Partition:
    number: int
    size_mib: int | None  # None: the rest of the disk
    fs: str  # "ext4" | "xfs" | "swap"
    mount: str = ""  # absolute mount point; "" for none
    label: str = ""  # file system label; "" for none
    options: str = ""  # mount options; "" for the defaults


@dataclass(frozen=True)
class DiskConfig:
    device: str
    label: str  # partition table: "gpt" | "dos"
    wipe: str  # "never" | "if-unformatted" | "always"
    partitions: tuple[Partition, ...]


_FIELD_ESCAPE = re.compile(r"\\0([0-7]{3})")


def decode_disk_field(raw: str, what: str) -> str:
    """A disk-config value: "-" is empty; `\\0ooo` is the byte ooo (octal), the bytes being
    UTF-8. Any other backslash is an error, as is a decoded NUL or invalid UTF-8."""
    if raw == "-":
        return ""
    out = bytearray()
    pos = 0
    while pos < len(raw):
        backslash = raw.find("\\", pos)
        if backslash < 0:
            out += raw[pos:].encode("utf-8")
            break
        out += raw[pos:backslash].encode("utf-8")
        match = _FIELD_ESCAPE.match(raw, backslash)
        if match is None:
            raise DiskError(f"{what} {raw!r}: a backslash must start a \\0ooo escape")
        byte = int(match.group(1), 8)
        if not 0 < byte < 256:
            raise DiskError(f"{what} {raw!r}: escape {match.group(0)} is not a non-NUL byte")
        out.append(byte)
        pos = match.end()
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DiskError(f"{what} {raw!r} is not UTF-8 once decoded") from e


def parse_size(raw: str, what: str) -> int | None:
    if raw == "rest":
        return None
    match = _SIZE.match(raw)
    if match is None or int(match.group(1)) == 0:
        raise DiskError(f"{what}: bad size {raw!r} (<N>MiB, <N>GiB, <N>TiB with N > 0, or rest)")
    return int(match.group(1)) * _SIZE_MIB[match.group(2)]


def normalize_mount_point(value: str, what: str) -> str:
    parts = value.split("/")
    if not value.startswith("/") or any(p in (".", "..") for p in parts):
        raise DiskError(f"{what}: mount point {value!r} is not an absolute normalized path")
    kept = [p for p in parts if p]
    if not kept:
        raise DiskError(f"{what}: mount point {value!r} is the root directory")
    return "/" + "/".join(kept)


def parse_partition(fields: list[str], expected: int, what: str) -> Partition:
    if len(fields) != 7:
        raise DiskError(f"{what}: a part line has 7 fields, not {len(fields)}")
    _, number, size, fs, mount, label, options = fields
    if number != str(expected):
        raise DiskError(f"{what}: partition number {number!r}, expected {expected}")
    size_mib = parse_size(size, what)
    if fs not in DISK_FS:
        raise DiskError(f"{what}: bad file system {fs!r} (one of {', '.join(DISK_FS)})")
    mount = decode_disk_field(mount, f"{what}: mount point")
    if mount:
        if fs == "swap":
            raise DiskError(f"{what}: a swap partition has no mount point ({mount!r})")
        mount = normalize_mount_point(mount, what)
    label = decode_disk_field(label, f"{what}: label")
    if any(ord(c) < 0x20 or c == "\x7f" for c in label):
        raise DiskError(f"{what}: label {label!r} has a control character")
    if len(label.encode("utf-8")) > _LABEL_MAX[fs]:
        raise DiskError(f"{what}: label {label!r} is longer than {_LABEL_MAX[fs]} bytes for {fs}")
    options = decode_disk_field(options, f"{what}: options")
    if any(c.isspace() or ord(c) < 0x20 for c in options):
        raise DiskError(f"{what}: mount options {options!r} contain white space")
    return Partition(int(number), size_mib, fs, mount, label, options)


def parse_disk_config(text: str) -> DiskConfig:
    """Parse and validate the whole file; raises DiskError naming the line."""
    settings: dict[str, str] = {}
    partitions: list[Partition] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        what = f"line {lineno}"
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        keyword = fields[0].partition("=")[0]
        if fields[0] == "part":
            if partitions and partitions[-1].size_mib is None:
                raise DiskError(f"{what}: partition after the one of size 'rest' (must be last)")
            partitions.append(parse_partition(fields, len(partitions) + 1, what))
        elif "=" in fields[0] and keyword in ("device", "label", "wipe"):
            if len(fields) != 1:
                raise DiskError(f"{what}: {keyword}= takes one value without spaces")
            if keyword in settings:
                raise DiskError(f"{what}: {keyword}= given twice")
            settings[keyword] = fields[0].partition("=")[2]
        else:
            raise DiskError(f"{what}: unknown keyword {keyword!r}")
    if "device" not in settings:
        raise DiskError("no device= line")
    device = decode_disk_field(settings["device"], "device")
    if not device.startswith("/") or "\0" in device:
        raise DiskError(f"device {device!r} is not an absolute path")
    label = settings.get("label", DEFAULT_DISK_LABEL)
    if label not in DISK_LABELS:
        raise DiskError(f"bad partition table label={label!r} (one of {', '.join(DISK_LABELS)})")
    wipe = settings.get("wipe", DEFAULT_DISK_WIPE)
    if wipe not in DISK_WIPE:
        raise DiskError(f"bad wipe={wipe!r} (one of {', '.join(DISK_WIPE)})")
    if not partitions:
        raise DiskError("no part lines")
    if label == "dos" and len(partitions) > 4:
        # More would need an extended partition.
        raise DiskError(f"a dos partition table holds 4 partitions, not {len(partitions)}")
    return DiskConfig(device, label, wipe, tuple(partitions))


def partition_device(disk: str, number: int) -> str:
    return f"{disk}p{number}" if disk[-1:].isdigit() else f"{disk}{number}"


def sfdisk_script(config: DiskConfig) -> str:
    lines = [f"label: {config.label}"]
    for part in config.partitions:
        kind = "swap" if part.fs == "swap" else "linux"
        size = "" if part.size_mib is None else f"size={part.size_mib}MiB, "
        lines.append(f"{size}type={kind}")
    return "\n".join(lines) + "\n"


def mkfs_argv(part: Partition, device: str) -> list[str]:
    label = ["-L", part.label] if part.label else []
    if part.fs == "ext4":
        return ["mkfs.ext4", "-F", "-q", *label, device]
    if part.fs == "xfs":
        return ["mkfs.xfs", "-f", *label, device]
    return ["mkswap", *label, device]


def require_tools(names: Sequence[str]) -> None:
    missing = [name for name in dict.fromkeys(names) if find_program(name) is None]
    if missing:
        raise DiskError(
            "; ".join(
                f"{n} not found (Debian package {TOOL_PACKAGES.get(n, '?')})" for n in missing
            )
        )


def fstab_escape(value: str) -> str:
    """Space, tab, newline and backslash as the octal escapes fstab and /proc/mounts use."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in value)


def fstab_unescape(value: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), value)


def is_mounted(device: str, mount: str) -> bool:
    """Whether `device` is mounted on `mount` (per MOUNTS_FILE)."""
    for line in (read_text(paths.MOUNTS_FILE) or "").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fstab_unescape(fields[1]) == mount:
            source = fstab_unescape(fields[0])
            if os.path.realpath(source) == os.path.realpath(device):
                return True
    return False


def is_swap_active(device: str) -> bool:
    lines = (read_text(paths.SWAPS_FILE) or "").splitlines()[1:]  # after the header line
    target = os.path.realpath(device)
    return any(
        line.split() and os.path.realpath(fstab_unescape(line.split()[0])) == target
        for line in lines
    )


def wait_for_devices(devices: Sequence[str]) -> list[str]:
    """Wait up to PARTITION_WAIT seconds for the device nodes; returns those still missing."""
    deadline = time.monotonic() + paths.PARTITION_WAIT
    while True:
        missing = [p for p in devices if not os.path.exists(p)]
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.1)


def has_partition_table(disk: str, run: Runner, reporter: Reporter) -> bool:
    """For wipe=if-unformatted. Raises DiskError when the disk holds something else, e.g. a
    file system on the whole device, or cannot be probed: never taken for blank."""
    if run_logged(["sfdisk", "--dump", disk], run, reporter, "sfdisk") == 0:
        return True
    status = run_logged(["blkid", "-p", disk], run, reporter, "blkid")
    if status == 2:  # blkid: nothing found
        return False
    if status == 0:
        raise DiskError(
            "no partition table, but a signature blkid recognizes (see runner.log); "
            "not partitioned (wipe=always would)"
        )
    raise DiskError(f"cannot probe the disk: blkid -p exited with status {status}")


def settle(run: Runner, reporter: Reporter) -> None:
    if find_program("udevadm") is not None:
        run_logged(["udevadm", "settle"], run, reporter, "udevadm")


def partition_disk(
    config: DiskConfig, disk: str, devices: Sequence[str], run: Runner, reporter: Reporter
) -> None:
    """Write the partition table, wait for the partitions and make their file systems."""
    argv = ["sfdisk", "--wipe", "always", "--wipe-partitions", "always", disk]
    status = run_logged(argv, run, reporter, "sfdisk", input=sfdisk_script(config))
    if status != 0:
        raise DiskError(f"sfdisk failed (status {status}; is the disk in use? see runner.log)")
    if find_program("partx") is not None:
        # The kernel may not have re-read the table (e.g. loop devices); updates only.
        run_logged(["partx", "-u", disk], run, reporter, "partx")
    settle(run, reporter)
    missing = wait_for_devices(devices)
    if missing:
        raise DiskError(
            f"partition {', '.join(missing)} did not appear within {paths.PARTITION_WAIT:g}s"
        )
    n = len(config.partitions)
    reporter.step(f"disk {config.device}: partitioned ({config.label}, {n} partitions)")
    for part, device in zip(config.partitions, devices, strict=True):
        argv = mkfs_argv(part, device)
        status = run_logged(argv, run, reporter, argv[0])
        if status != 0:
            raise DiskError(f"{argv[0]} failed on {device} (status {status}; see runner.log)")
        label = f", label {part.label}" if part.label else ""
        reporter.step(f"disk {config.device}: made {part.fs} on {device}{label}")


def mount_partition(
    config: DiskConfig, part: Partition, device: str, run: Runner, reporter: Reporter
) -> str | None:
    """Mount or swap on one partition; returns its fstab line, or None when it failed."""
    if part.fs == "swap":
        if is_swap_active(device):
            reporter.step(f"disk {config.device}: swap on {device} already active")
        else:
            argv = ["swapon", *(["-o", part.options] if part.options else []), device]
            status = run_logged(argv, run, reporter, "swapon")
            if status != 0:
                reporter.error(f"disk {config.device}: swapon {device} failed (status {status})")
                return None
            reporter.step(f"disk {config.device}: swap on {device}")
        return f"{fstab_escape(device)} none swap {part.options or 'sw'} 0 0 {FSTAB_MARK}"
    if is_mounted(device, part.mount):
        reporter.step(f"disk {config.device}: {device} already mounted on {part.mount}")
    else:
        try:
            os.makedirs(part.mount, mode=0o755, exist_ok=True)
        except OSError as e:
            reporter.error(f"disk {config.device}: cannot create mount point {part.mount}: {e}")
            return None
        options = ["-o", part.options] if part.options else []
        argv = ["mount", "-t", part.fs, *options, device, part.mount]
        status = run_logged(argv, run, reporter, "mount")
        if status != 0:
            reporter.error(
                f"disk {config.device}: mounting {device} on {part.mount} failed (status {status})"
            )
            return None
        reporter.step(f"disk {config.device}: mounted {device} on {part.mount}")
    return (
        f"{fstab_escape(device)} {fstab_escape(part.mount)} {part.fs} "
        f"{part.options or 'defaults'} 0 0 {FSTAB_MARK}"
    )


def update_fstab(lines: Sequence[str], reporter: Reporter) -> None:
    """Replace the lines marked FSTAB_MARK by `lines`, keeping all others; atomic, with the
    file's mode and owner kept. No file and nothing to add: nothing is written."""
    path = os.path.realpath(paths.FSTAB_FILE)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not lines:
            return
        old, mode, uid, gid = "", 0o644, 0, 0
    else:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            old = f.read()
        mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    kept = [line for line in old.splitlines() if not line.rstrip().endswith(FSTAB_MARK)]
    new = "".join(f"{line}\n" for line in [*kept, *lines])
    if new == old:
        reporter.detail(f"{paths.FSTAB_FILE} unchanged")
        return
    write_file(path, new.encode("utf-8", errors="surrogateescape"), mode, uid, gid)
    reporter.detail(f"{paths.FSTAB_FILE}: {len(lines)} lines marked {FSTAB_MARK!r}")


def setup_disk(config: DiskConfig, run: Runner, reporter: Reporter) -> bool | None:
    """True: done; False: failed (reported); None: the disk is not on this node."""
    if not os.path.exists(config.device):
        reporter.warn(f"disk {config.device} not found on this node: disk setup skipped")
        return None
    disk = os.path.realpath(config.device)
    if disk != config.device:
        reporter.detail(f"disk {config.device} is {disk}")
    if not stat.S_ISBLK(os.stat(disk).st_mode):
        raise DiskError("not a block device")
    devices = [partition_device(disk, p.number) for p in config.partitions]
    used = [
        (part, device)
        for part, device in zip(config.partitions, devices, strict=True)
        if part.fs == "swap" or part.mount
    ]
    mount_tools = [("swapon" if part.fs == "swap" else "mount") for part, _ in used]
    if config.wipe == "if-unformatted":
        require_tools(["sfdisk", "blkid"])
        partition = not has_partition_table(disk, run, reporter)
    else:
        partition = config.wipe == "always"
    if partition:
        require_tools(["sfdisk", *(_MKFS[p.fs] for p in config.partitions), *mount_tools])
        partition_disk(config, disk, devices, run, reporter)
    else:
        require_tools(mount_tools)
        reporter.step(f"disk {config.device}: kept existing partitions (wipe={config.wipe})")
        if used:
            settle(run, reporter)
            wait_for_devices([device for _, device in used])
    fstab: list[str] = []
    ok = True
    for part, device in used:
        if not os.path.exists(device):
            reporter.error(f"disk {config.device}: partition {device} not found")
            ok = False
            continue
        line = mount_partition(config, part, device, run, reporter)
        if line is None:
            ok = False
        else:
            fstab.append(line)
    update_fstab(fstab, reporter)
    return ok


def initialize_disks(run: Runner, reporter: Reporter) -> tuple[int, int]:
    """The disk step. Returns (disks configured, disks failed): (0, 0) without a
    disk-config, (1, 1) when it is invalid or setting the disk up failed."""
    text = read_text(paths.DISK_CONFIG_FILE)
    if text is None:
        reporter.detail(f"no {paths.DISK_CONFIG_FILE}: no local disk to set up")
        return 0, 0
    result: bool | None = False
    try:
        config = parse_disk_config(text)
    except DiskError as e:
        reporter.error(f"{paths.DISK_CONFIG_FILE}: {e}")
    else:
        try:
            result = setup_disk(config, run, reporter)
        except (DiskError, OSError) as e:
            reporter.error(f"disk {config.device}: {e}")
            result = False
    if result is False:
        reporter.step("disk setup FAILED")
        return 1, 1
    reporter.step("disk setup done" if result else "disk setup skipped")
    return 1, 0
