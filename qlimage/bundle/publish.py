"""Publishing a node's files below qlustar/nodes/<mac>/: its bundle, the bundle's checksum and
the chroot line the initrd reads."""

from __future__ import annotations

import hashlib
from pathlib import Path

from qlimage import contract
from qlimage.atomic import write_bytes, write_text
from qlimage.bundle.render import bundle_json, render_bundle
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


def publish_node(site: Site, host: Host) -> None:
    """Render the node's bundle and publish it with its checksum (checksum last: a node that
    reads a new bundle with an old checksum refuses it and retries)."""
    layout = Layout(site)
    bundle, checksum, chroot = targets(layout, host)
    data = bundle_json(render_bundle(site, host))
    write_bytes(bundle, data)
    write_text(checksum, contract.checksum_line(hashlib.sha256(data).hexdigest(), bundle.name))
    write_text(chroot, chroot_line(site, host))
