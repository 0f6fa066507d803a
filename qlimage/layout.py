"""Where every output of a site lives below bootfiles/ (the paths nodes fetch are in pxe.py).

tftpboot/                      pxelinux.0, ldlinux.c32, links pxelinux.cfg and qlustar
pxelinux.cfg/                  default, one file per boot config, HOSTID links, .hosts
qlustar/boot/<gen>/            vmlinuz + initrd.img; `current` link and `history`
qlustar/images/<image>/<gen>/  <image>.img, .sha256, modules.json, state/; `current`, `history`
qlustar/nodes/<mac>/           bundle.json + .sha256 for the node runner
kernel/, stage/, manifests/, cache/   intermediate trees and doit's view of source trees
"""

from __future__ import annotations

from pathlib import Path

from qlimage.boot import pxelinux as pxe
from qlimage.image import kernel, publish
from qlimage.site import Host, Site


class Layout:
    """Where every output of a site lives (the paths nodes fetch are in pxe.py)."""

    def __init__(self, site: Site) -> None:
        b = site.paths.bootfiles
        self.bootfiles = b
        self.tftpboot = b / "tftpboot"
        self.pxelinux_cfg = b / "pxelinux.cfg"
        self.qlustar = b / "qlustar"
        self.kernel_dir = b / "kernel"
        self.kernel_info = b / "kernel" / kernel.INFO
        self.boot = self.qlustar / "boot"
        self.boot_current = self.boot / publish.CURRENT
        self.manifests = b / "manifests"

    @property
    def vmlinuz(self) -> Path:
        return self.boot_current / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.boot_current / "initrd.img"

    def image_root(self, name: str) -> Path:
        """The image's generations, `current`, `history`."""
        return self.qlustar / pxe.image_path(name)

    def image_current(self, name: str) -> Path:
        return self.image_root(name) / publish.CURRENT

    def image(self, name: str) -> Path:
        return self.image_current(name) / f"{name}.img"

    def image_sum(self, name: str) -> Path:
        return self.image_current(name) / f"{name}.img.sha256"

    def image_modules(self, name: str) -> Path:
        return self.image_current(name) / "modules.json"

    def node_dir(self, host: Host) -> Path:
        """Where a node's bundle is published; the runner asks for it by the boot NIC's MAC."""
        return self.qlustar / "nodes" / host.mac.replace(":", "-")

    def bundle(self, host: Host) -> Path:
        return self.node_dir(host) / "bundle.json"

    def stage(self, name: str) -> Path:
        return self.bootfiles / "stage" / name

    def stage_manifest(self, name: str) -> Path:
        return self.bootfiles / "stage" / f"{name}.manifest"
