"""The one map of bootfiles/: every output and every hidden state file of a site.

No other module spells a path below bootfiles/; the names a node fetches come from
`qlimage.contract`, so the map and the node cannot disagree.

    tftpboot/                        pxelinux.0, ldlinux.c32; links pxelinux.cfg and qlustar
    tftpboot/bootx64.efi, grubx64.efi  UEFI: Debian-signed shim and GRUB network image
    tftpboot/grub/                   grub.cfg (default), grub.cfg-01-<mac> per host
    tftpboot/grub/x86_64-efi/        http.mod, for boot configs with grub_fetch = "http"
    tftpboot/boot.ipxe, ipxe/        iPXE: dispatch script, <mac>.ipxe per host
    pxelinux.cfg/                    default, one file per boot config, HOSTID links, .hosts
    qlustar/boot/<gen>/              vmlinuz + initrd.img; `current` link and `history`
    qlustar/images/<image>/<gen>/    <image>.img, .sha256, modules.json; `current`, `history`
    qlustar/nodes/<mac>              link to the node's generation: what the runner fetches
    qlustar/nodes/.<mac>.<digest>/   bundle.json + .sha256, chroot: one node generation
    qlustar/cluster/                 ssh_known_hosts, shosts.equiv, SHA256SUMS: the cluster's
                                     SSH host files, one copy every node's runner installs
    head/                            dnsmasq.conf, nginx.conf: the head services' configs;
                                     qlimage-serve.service: the systemd unit that runs them
    head/run/                        what `qlimage serve` writes: pids, leases, logs, nginx temp
    head/exports.d/                  qlustar-chroots.exports: the NFS exports of the chroots
    kernel/                          the unpacked kernel package and kernel.json
    stage/<image>/, <image>.manifest the staged root tree of each image
    manifests/                       doit's view of source trees (modules, overlays);
                                     bundles.json: what the bundle task served per node
    cache/modules/                   unpacked module packages, by package and version
    .build.lock, .build.running      the build lock; the marker a killed build leaves behind
    .validated.json                  site files that passed their schema (validation cache)
    .pool-control.json               control data of the pool's .debs (pool cache)
    .doit-state.json                 doit's dependency state
    .apt-hook-pending                the apt hook changed the pool; images not rebuilt yet
    .build-stamp.json                what the last full build read: a no-op build stops here
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qlimage import contract

if TYPE_CHECKING:  # the site loader imports this module: no import cycle at run time
    from qlimage.site.model import Host, Site

# The user's cache of downloads (pool.archive) and compiled templates (templates), shared by
# every site the user builds.
USER_CACHE = Path("~/.cache/qlimage")

# Hidden state files directly below bootfiles/.
LOCK = ".build.lock"
RUNNING = ".build.running"
VALIDATION_CACHE = ".validated.json"
POOL_CACHE = ".pool-control.json"
DOIT_STATE = ".doit-state.json"
APT_HOOK_MARKER = ".apt-hook-pending"
BUILD_STAMP = ".build-stamp.json"
HOST_PIECES = ".host-pieces"
KERNEL_INFO = "kernel.json"


class Layout:
    """Where every output of a site lives; built from a site or from its bootfiles path."""

    def __init__(self, site: Site | Path) -> None:
        b = site if isinstance(site, Path) else site.paths.bootfiles
        self.bootfiles = b
        self.tftpboot = b / "tftpboot"
        self.pxelinux_cfg = b / "pxelinux.cfg"
        self.grub_dir = self.tftpboot / "grub"  # GRUB's prefix: (tftp,<head>)/grub
        self.grub_modules = self.grub_dir / "x86_64-efi"  # where GRUB's insmod looks
        self.ipxe_dir = self.tftpboot / "ipxe"  # <mac>.ipxe, chained from boot.ipxe
        self.qlustar = b / contract.QLUSTAR_DIR
        self.kernel_dir = b / "kernel"
        self.kernel_info = self.kernel_dir / KERNEL_INFO
        self.boot = self.qlustar / contract.BOOT_DIR
        self.boot_current = self.boot / contract.CURRENT
        self.manifests = b / "manifests"
        self.bundle_table = self.manifests / "bundles.json"
        self.stage_dir = b / "stage"
        self.module_cache = b / "cache" / "modules"
        self.lock = b / LOCK
        self.running = b / RUNNING
        self.validation_cache = b / VALIDATION_CACHE
        self.pool_cache = b / POOL_CACHE
        self.doit_state = b / DOIT_STATE
        self.apt_hook_marker = b / APT_HOOK_MARKER
        self.build_stamp = b / BUILD_STAMP
        self.host_pieces = b / HOST_PIECES
        self.head = b / "head"
        self.dnsmasq_conf = self.head / "dnsmasq.conf"
        self.nginx_conf = self.head / "nginx.conf"
        self.serve_unit = self.head / "qlimage-serve.service"  # systemd unit of `qlimage serve`
        self.head_run = self.head / "run"
        # The head's /etc/exports.d/ part for the chroots it serves (an admin links or copies it).
        self.chroot_exports = self.head / "exports.d" / "qlustar-chroots.exports"

    @property
    def vmlinuz(self) -> Path:
        return self.boot_current / contract.KERNEL_FILE

    @property
    def initrd(self) -> Path:
        return self.boot_current / contract.INITRD_FILE

    def image_root(self, name: str) -> Path:
        """The image's generations, `current`, `history`."""
        return self.qlustar / contract.image_path(name)

    def image_current(self, name: str) -> Path:
        return self.image_root(name) / contract.CURRENT

    def image(self, name: str) -> Path:
        return self.image_current(name) / contract.image_file(name)

    def image_sum(self, name: str) -> Path:
        return self.image_current(name) / contract.image_sum_file(name)

    def image_modules(self, name: str) -> Path:
        return self.image_current(name) / contract.MODULES_JSON

    def nodes(self) -> Path:
        return self.qlustar / contract.NODES_DIR

    def cluster_dir(self) -> Path:
        """The cluster-wide public files (contract.CLUSTER_FILES): served once, not per node."""
        return self.qlustar / contract.CLUSTER_DIR

    def cluster_file(self, name: str) -> Path:
        """A file of cluster_dir(), or its contract.CLUSTER_SUMS."""
        return self.qlustar / contract.cluster_path(name)

    def node_dir(self, host: Host) -> Path:
        """Where a node's bundle is published; the runner asks for it by the boot NIC's MAC."""
        return self.qlustar / contract.node_dir(host.mac)

    def node_generation(self, host: Host, name: str) -> Path:
        """One generation of the node's files, a hidden sibling that `node_dir` links to."""
        return self.nodes() / f".{self.node_dir(host).name}.{name}"

    def bundle(self, host: Host) -> Path:
        return self.node_dir(host) / contract.BUNDLE_FILE

    def stage(self, name: str) -> Path:
        return self.stage_dir / name

    def stage_manifest(self, name: str) -> Path:
        return self.stage_dir / f"{name}.manifest"

    def module_tree(self, package: str, version: str) -> Path:
        """An unpacked module package, shared by every image that uses it."""
        return self.module_cache / f"{package}_{version}"
