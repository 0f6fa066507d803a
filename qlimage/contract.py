"""Every name the node relies on, defined once: the head side of the head <-> node contract.

The node (qlimage/node: the initrd's /init, /sbin/init.qlustar, the runner) cannot import this
module; the runner mirrors what it needs in qlimage/node/runner/names.py and
tests/test_node_contract.py keeps both, and the shell scripts, in step with this file.

A leaf module: constants and tiny pure functions, no imports from qlimage.
"""

from __future__ import annotations

# --- URL paths below the head's qlustar tree ----------------------------------------------
# The tree is served over HTTP at <qlustar.http> and reachable from the TFTP root as qlustar/.
QLUSTAR_DIR = "qlustar"

NODES_DIR = "nodes"  # nodes/<mac>/: one directory per node, named by its MAC with dashes
BUNDLE_FILE = "bundle.json"  # the node's bundle, fetched by the runner
CHECKSUM_SUFFIX = ".sha256"  # <file>.sha256 beside a file: `<hex>  <file name>` (sha256sum)
CHROOT_FILE = "chroot"  # nodes/<mac>/chroot: CHROOT_LINE or empty, read by the initrd
IMAGES_DIR = "images"  # images/<image>/: the image's generations, CURRENT and HISTORY
BOOT_DIR = "boot"  # boot/: the kernel and initrd generations, CURRENT and HISTORY
# cluster/: the cluster-wide public files, one copy for all nodes (a copy per bundle would make
# the bundles quadratic in the number of nodes); the runner installs them after the bundle.
CLUSTER_DIR = "cluster"
CLUSTER_SUMS = "SHA256SUMS"  # cluster/SHA256SUMS: `<hex>  <name>` lines (sha256sum), sorted
# (name below cluster/, path on the node): the runner installs only these, whatever
# SHA256SUMS lists; each CLUSTER_FILE_MODE, root:root (public data).
CLUSTER_FILES = (
    ("shosts.equiv", "/etc/ssh/shosts.equiv"),
    ("ssh_known_hosts", "/etc/ssh/ssh_known_hosts"),
)
CLUSTER_FILE_MODE = 0o644

# --- a published generation ---------------------------------------------------------------
CURRENT = "current"  # link to the current generation, in images/<image>/ and boot/
HISTORY = "history"  # the generations kept, oldest first, one a line
GENERATION = "generation"  # in each generation: its own name and a newline
MODULES_JSON = "modules.json"  # in an image generation: the resolved modules
KERNEL_FILE = "vmlinuz"  # in a boot generation
INITRD_FILE = "initrd.img"  # in a boot generation
# In a generation published by `qlimage edit -i/-s` (not from inputs): {"part", "base", "image"}.
HAND_EDITED = "hand-edited.json"

# --- the kernel command line (written by the boot loader configs, read on the node) --------
CMDLINE_HTTP = "qlustar.http"  # base URL of the head's qlustar tree (initrd, runner)
CMDLINE_IMAGE = "qlustar.image"  # image name (initrd)
CMDLINE_PATH = "qlustar.path"  # the image's directory below the base: image_path() (initrd)
CMDLINE_SUM = "qlustar.sum"  # checksum file name in a generation: image_sum_file() (initrd)
CMDLINE_BOOTCFG = "qlustar.bootcfg"  # the boot config's name (for the admin; boot tests)
CMDLINE_PXECFG = "qlustar.pxecfg"  # the pxelinux.cfg file that booted (default or a HOSTID)
CMDLINE_MCAST = "qlustar.mcast"  # <head>:<port> of the multicast daemon, optional (initrd)
CMDLINE_BOOTIF = "BOOTIF"  # 01-<mac with dashes>, from pxelinux IPAPPEND 2 (initrd, runner)
CMDLINE_DEBUG = "debug"  # bare flag: more console output (initrd, init.qlustar, runner)
CMDLINE_INITRD_SHELL = "initrd-shell"  # bare flag: a shell in the initrd before the network
CMDLINE_EARLY_SHELL = "early-shell"  # bare flag: a shell at the start of init.qlustar

# Every key the node reads from /proc/cmdline.
CMDLINE_KEYS = (
    CMDLINE_HTTP,
    CMDLINE_IMAGE,
    CMDLINE_PATH,
    CMDLINE_SUM,
    CMDLINE_BOOTCFG,
    CMDLINE_PXECFG,
    CMDLINE_MCAST,
    CMDLINE_BOOTIF,
    CMDLINE_DEBUG,
    CMDLINE_INITRD_SHELL,
    CMDLINE_EARLY_SHELL,
)

# --- the bundle ------------------------------------------------------------------------------
BUNDLE_FORMAT = 1  # the runner refuses any other format
OPTIONS_DIR = "/etc/qlustar/options.d"  # option files the bundle writes on the node
DISK_CONFIG = "disk-config"  # OPTIONS_DIR/disk-config: the local disk, read by the runner
DEFAULT_DISK_LABEL = "gpt"  # the partition table when the disk option names none
DEFAULT_DISK_WIPE = "if-unformatted"  # the wipe policy when the disk option names none

# --- paths in every image (installed by the pipeline, see qlimage/image/stage.py) ----------
INIT_QLUSTAR_PATH = "/sbin/init.qlustar"  # the initrd switches root to it
RUNNER_PATH = "/usr/lib/qlustar/qlustar-runner"  # init.qlustar runs it
INIT_D_DIR = "/lib/qlustar/init.d"  # Root FS Customization scripts, run by the runner


def node_dir(mac: str) -> str:
    """nodes/<mac>: `52:54:00:AB:CD:EF` -> `nodes/52-54-00-ab-cd-ef`."""
    return f"{NODES_DIR}/{mac.replace(':', '-').lower()}"


def bundle_path(mac: str) -> str:
    return f"{node_dir(mac)}/{BUNDLE_FILE}"


def cluster_path(name: str) -> str:
    """A cluster file (or CLUSTER_SUMS) below the qlustar tree: `cluster/<name>`."""
    return f"{CLUSTER_DIR}/{name}"


def checksum_name(name: str) -> str:
    """The checksum file beside `name`."""
    return f"{name}{CHECKSUM_SUFFIX}"


def checksum_line(digest: str, name: str) -> str:
    """The content of a checksum file (sha256sum format): `<hex>  <file name>`."""
    return f"{digest}  {name}\n"


CHROOT_FIELDS = 4  # name, server, port, path: the initrd refuses a line with another count


def chroot_line(name: str, source: str) -> str:
    """nodes/<mac>/chroot: `<name> <server> <port> <path>` (source: `<server> <port> <path>`).

    Fields are separated by one space and hold no white space or control character (the site
    schemas forbid them), so the initrd's `set -- $line` splits them back unambiguously; a
    value that would break that is a bug, refused here rather than published."""
    fields = [name, *source.split(" ")]
    if len(fields) != CHROOT_FIELDS or any(
        not f or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in f) for f in fields
    ):
        raise ValueError(f"chroot line fields {fields!r}: expected {CHROOT_FIELDS} plain words")
    return " ".join(fields) + "\n"


def image_path(image: str) -> str:
    """The image's directory below the qlustar tree (the value of qlustar.path)."""
    return f"{IMAGES_DIR}/{image}"


def image_file(image: str) -> str:
    """The squashfs file in an image generation."""
    return f"{image}.img"


def image_sum_file(image: str) -> str:
    """The image's checksum file in a generation (the value of qlustar.sum)."""
    return checksum_name(image_file(image))


def boot_path(name: str) -> str:
    """A file of the current boot generation, relative to the TFTP root (pxelinux KERNEL/INITRD)."""
    return f"{QLUSTAR_DIR}/{BOOT_DIR}/{CURRENT}/{name}"


def cmdline_arg(key: str, value: str) -> str:
    return f"{key}={value}"
