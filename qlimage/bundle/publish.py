"""Publishing a node's files: its bundle, the bundle's checksum and the chroot line the initrd
reads, as one generation directory qlustar/nodes/.<mac>.<digest>/ that the link
qlustar/nodes/<mac> switches to with one rename. So a node sees the old set or the new set,
never a bundle with another bundle's checksum; and a node that left the inventory loses its
link and its files in the same build (`prune_nodes`)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from qlimage import contract
from qlimage.atomic import TMP_PREFIX, symlink, write_bytes
from qlimage.bundle.render import bundle_json, render_bundle, warn_private_files
from qlimage.image.publish import discard, fault_point, fsync_tree
from qlimage.layout import Layout
from qlimage.site import Host, Site


def targets(layout: Layout, host: Host) -> list[Path]:
    bundle = layout.bundle(host)
    return [
        bundle,
        bundle.with_name(contract.checksum_name(bundle.name)),
        chroot_file(layout, host),
    ]


def chroot_file(layout: Layout, host: Host) -> Path:
    # The initrd reads this before it builds the union: overlayfs cannot gain a layer later, so
    # a node's chroot (its own option, else its image's) must be known then, not by the runner.
    return layout.node_dir(host) / contract.CHROOT_FILE


def chroot_line(site: Site, host: Host) -> str:
    chroot = site.host_chroot(host)
    return contract.chroot_line(chroot.name, chroot.source) if chroot else ""


def node_files(site: Site, host: Host) -> dict[str, bytes]:
    """{file name in the node's directory: bytes}."""
    data = bundle_json(render_bundle(site, host))
    digest = hashlib.sha256(data).hexdigest()
    return {
        contract.BUNDLE_FILE: data,
        contract.checksum_name(contract.BUNDLE_FILE): contract.checksum_line(
            digest, contract.BUNDLE_FILE
        ).encode(),
        contract.CHROOT_FILE: chroot_line(site, host).encode(),
    }


def generation_name(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name, data in sorted(files.items()):
        h.update(f"{name}\0{len(data)}\0".encode() + data)
    return h.hexdigest()[:16]


def is_complete(gen: Path, files: dict[str, bytes]) -> bool:
    try:
        return sorted(p.name for p in gen.iterdir()) == sorted(files) and all(
            (gen / n).read_bytes() == data for n, data in files.items()
        )
    except OSError:
        return False


def publish_node(site: Site, host: Host) -> dict[str, str]:
    """Render the node's files, write them as a new generation and switch the node's link to
    it with one rename; then delete its older generations. Returns the generation it served
    (doit keeps it with the task: `still_served`)."""
    layout = Layout(site)
    files = node_files(site, host)
    warn_private_files(site, host)  # a Root FS file not world-readable: say it travels anyway
    gen = layout.node_generation(host, generation_name(files))
    if not is_complete(gen, files):
        write_generation(gen, files)
    fault_point("node-generation-renamed")
    link_node(layout.node_dir(host), gen.name)
    fault_point("node-linked")
    for old in generations_of(layout.nodes(), layout.node_dir(host).name):
        if old != gen:
            discard(old, "node-discard-renamed")
    return {SERVED: gen.name}


SERVED = "served"


def still_served(link: Path, values: dict[str, Any]) -> bool:
    """Whether the node's link still points at the generation this task served last. A task
    that comes back under an old name (a node renamed and renamed back) finds its old values
    unchanged, while the link shows what the task of the other name served."""
    try:
        return os.readlink(link) == values.get(SERVED)
    except OSError:
        return False


def generations_of(nodes: Path, mac: str) -> list[Path]:
    return sorted(p for p in nodes.glob(f".{mac}.*") if not p.name.startswith(TMP_PREFIX))


def generation_mac(name: str) -> str | None:
    """`.52-54-00-12-34-56.<digest>` -> the node directory name it belongs to."""
    if not name.startswith(".") or name.startswith(TMP_PREFIX) or name.count(".") != 2:
        return None
    return name.split(".")[1]


def write_generation(gen: Path, files: dict[str, bytes]) -> None:
    gen.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}node.", dir=gen.parent))
    try:
        os.chmod(work, 0o755)
        for file, data in files.items():
            write_bytes(work / file, data)
        fsync_tree(work)
        discard(gen)  # a broken leftover of the same name
        os.rename(work, gen)
    finally:
        if work.exists():
            discard(work)


def link_node(link: Path, target: str) -> None:
    if link.is_symlink() and os.readlink(link) == target:
        return
    if link.is_dir() and not link.is_symlink():
        # A node directory of an older layout: a real directory cannot be swapped for a link
        # by a rename, so it goes first (the node briefly gets a 404 and retries).
        discard(link)
    symlink(link, target)


def prune_nodes(layout: Layout, macs: list[str]) -> None:
    """Remove the link and the generations of every node directory not in `macs` (node_dir
    names): a machine booting with a MAC that left the inventory gets nothing, not the old
    node's identity and keys. Links go first, so nothing half deleted is ever served."""
    wanted = set(macs)
    nodes = layout.nodes()
    if not nodes.is_dir():
        return
    entries = sorted(nodes.iterdir())
    for entry in entries:
        if entry.name.startswith(".") or entry.name in wanted:
            continue
        if entry.is_symlink():
            entry.unlink()
        else:
            discard(entry)
        fault_point("node-unlinked")
    for entry in entries:
        mac = generation_mac(entry.name)
        if mac is not None and mac not in wanted:
            discard(entry)
