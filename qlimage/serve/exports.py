"""The head's NFS exports of the UnionFS chroots: one `/etc/exports.d` part, written by the
graph (`task_exports`) to bootfiles/head/exports.d/qlustar-chroots.exports.

Only chroots whose server is the head are exported here; another server exports its own. Each
line exports the tree read-only to the boot network (nodes mount it as the union's lowest,
read-only layer) with `no_root_squash` (root on the node must read root-only files of the chroot
as the packages installed them) and an `fsid` derived from the chroot's name alone: file handles
stay valid across head reboots and across adding or removing other chroots.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from qlimage.atomic import write_text
from qlimage.errors import ConfigError
from qlimage.layout import Layout
from qlimage.site import Site
from qlimage.site.model import Chroot

OPTIONS = "ro,no_root_squash,no_subtree_check"
# exportfs splits a line at white space and reads `#`, quotes and backslashes specially; the
# schemas already allow only these characters in a tree's path (the default one comes from
# [paths] chroot_trees), checked again here because this is the file exportfs reads.
SAFE_PATH = re.compile(r"/[A-Za-z0-9._/+@~-]*")
HEADER = (
    "# NFS exports of the UnionFS chroots this head serves; written by qlimage from\n"
    "# chroots/*/chroot.toml. Install as /etc/exports.d/qlustar-chroots.exports.\n"
)


def fsid(name: str) -> int:
    """A stable number in 1 .. 2**31-1 from the chroot's name (0 means the NFSv4 root)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") % (2**31 - 1) + 1


def exported(site: Site) -> list[Chroot]:
    """The chroots this head serves, by name."""
    return [c for _, c in sorted(site.chroots.items()) if c.server == site.head_address]


def render(site: Site) -> str:
    cidr = site.boot_network.cidr
    lines: list[str] = []
    seen: dict[int, str] = {}
    for c in exported(site):
        where = f"{site.paths.chroots.name}/{c.name}/chroot.toml"
        if not SAFE_PATH.fullmatch(c.path):
            raise ConfigError(
                [
                    f"{where}: .path: {c.path!r}: expected an absolute path exportfs"
                    " can read (letters, digits, '.', '_', '/', '+', '@', '~', '-')"
                ]
            )
        number = fsid(c.name)
        if number in seen:  # two names hashing alike: one in 2**31 per pair, refused, not guessed
            raise ConfigError(
                [
                    f"{where}: chroot {c.name!r} gets the NFS fsid of chroot"
                    f" {seen[number]!r} ({number}); rename one of them"
                ]
            )
        seen[number] = c.name
        lines.append(f"{c.path} {cidr}({OPTIONS},fsid={number})\n")
    return HEADER + "".join(lines)


def output(site: Site) -> Path:
    return Layout(site).chroot_exports


def write(text: str, target: Path) -> None:
    """Written beside and renamed in: an exportfs run never reads half a file."""
    write_text(target, text, 0o644)
