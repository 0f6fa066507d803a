"""The frozen site model: what every task receives instead of re-reading a site file.

Built once by `qlimage.site.load`; nothing downstream re-reads or re-checks a site file.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from qlimage.errors import ConfigError


@dataclass(frozen=True)
class Network:
    name: str
    cidr: ipaddress.IPv4Network
    gateway: str | None
    mtu: int | None
    boot: bool
    suffix: str


@dataclass(frozen=True)
class HostAddress:
    network: str
    address: str
    hostname: str
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class Host:
    name: str
    mac: str  # lower case, colon separated
    addresses: tuple[HostAddress, ...]
    bootconfig: str
    source: str  # the nodes.d file that defines it, for error messages
    # Effective options: each kind from the last assignment that sets it (see merge_options).
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # Where each option kind came from, e.g. {"mounts": "optionset compute (group rack1)"}.
    option_sources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # Public host keys as "type base64" (comments dropped): the known_hosts lines of the host.
    ssh_host_keys: tuple[str, ...] = ()

    def address_on(self, network: str) -> HostAddress | None:
        return next((a for a in self.addresses if a.network == network), None)


def addresses_on(hosts: Sequence[Host], network: str) -> list[HostAddress]:
    """Each host's address on `network`, in host order: every host has one (for the boot
    network, the loader requires it)."""
    out = []
    for host in hosts:
        if (address := host.address_on(network)) is None:
            raise AssertionError(f"{host.name}: no address on {network}")
        out.append(address)
    return out


@dataclass(frozen=True)
class Image:
    name: str
    flavor: str
    version: str
    modules: tuple[str, ...]  # "core" first, then as listed
    chroot: str | None
    description: str
    source: Path
    listed: tuple[str, ...] = ()  # the modules as the image file lists them (error messages)

    @property
    def root_hash_file(self) -> Path:
        """The image's own root password hash (mode 0600); absent: the head's is used."""
        return self.source.with_name(f"{self.name}.rootpw")


@dataclass(frozen=True)
class Chroot:
    """A UnionFS chroot: an NFS export the initrd mounts as the union's lowest layer."""

    name: str
    server: str
    port: int
    export: str
    description: str
    path: str = ""  # the tree on the head, absolute (exports line; create/clone/remove)
    flavor: str = ""  # the Debian suite the tree was built from
    version: str = ""  # the Qlustar feature release, x.y
    tasks: tuple[str, ...] = ()  # the chroot tasks (site.toml [chroot_tasks]) installed

    @property
    def source(self) -> str:
        """What the node mounts, as `/init` reads it: server, port and export path (none holds
        white space: the schema forbids it in the path)."""
        return f"{self.server} {self.port} {self.export}"


@dataclass(frozen=True)
class ChrootTask:
    """A package bundle (the seed's Qlustar task) that `qlimage chroot create --task` installs."""

    name: str
    packages: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class BootConfig:
    name: str
    image: str
    append: str
    description: str
    loader: str = "auto"  # "auto" (pxelinux / shim + GRUB by firmware) or "ipxe"
    grub_fetch: str = "tftp"  # how GRUB fetches kernel and initrd: "tftp" or "http"
    grub_http_server: str = ""  # with "http": the address whose port 80 serves qlustar/


@dataclass(frozen=True)
class Recipe:
    """How to build one image-module package from Debian packages plus our own files."""

    module: str
    flavor: str
    version: str
    description: str
    packages: tuple[str, ...]
    exclude: tuple[str, ...]
    busybox_links: bool
    directory: Path  # holds recipe.toml, optional files/ and changelog

    @property
    def package(self) -> str:
        return f"qlustar-module-{self.module}-{self.flavor}"

    def deb_name(self, arch: str = "amd64") -> str:
        return f"{self.package}_{self.version}_{arch}.deb"


@dataclass(frozen=True)
class Archive:
    sources: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]  # (uri, suites, components)
    arch: str
    index_max_age: float


@dataclass(frozen=True)
class Multicast:
    """ql-mcastd's settings ([multicast]); `address` is the control address (the head's
    unless set). Sessions use groups group_base .. +groups-1 and port pairs in
    data_port_first .. data_port_last."""

    enabled: bool = True
    address: str = ""
    port: int = 5000
    group_base: str = "232.1.0.0"
    groups: int = 256
    data_port_first: int = 5001
    data_port_last: int = 5999
    window: float = 3.0
    max_bitrate: str = "600m"


@dataclass(frozen=True)
class Paths:
    root: Path
    bootfiles: Path
    pool: Path
    images: Path
    nodes: Path
    overlays: Path
    rootfs: Path
    chroots: Path
    modules: Path
    cache: Path
    chroot_trees: Path = Path("/srv/qlustar/chroots")  # where chroot create|clone put trees


@dataclass(frozen=True)
class Site:
    name: str
    source_date_epoch: int
    head_address: str
    http_port: int
    head_shadow: Path
    paths: Paths
    archive: Archive
    kernel_package: str
    kernel_deb: Path | None
    initrd_modules: tuple[str, ...]
    squashfs_compressor: str
    squashfs_level: int | None
    squashfs_block_size: int
    networks: Mapping[str, Network]
    images: Mapping[str, Image]
    bootconfigs: Mapping[str, BootConfig]
    default_bootconfig: str | None
    serial: str
    console: str
    keep_generations: int
    hosts: tuple[Host, ...] = field(default=())
    recipes: tuple[Recipe, ...] = field(default=())
    chroots: Mapping[str, Chroot] = field(default_factory=lambda: MappingProxyType({}))
    chroot_tasks: Mapping[str, ChrootTask] = field(default_factory=lambda: MappingProxyType({}))
    # Head services (serve/): who besides the nodes may fetch over HTTP; DNS for the nodes.
    admin_networks: tuple[str, ...] = ()  # CIDRs, checked by the schema
    dns_servers: tuple[str, ...] = ()  # empty: the head's address
    serve_dns: bool = False
    multicast: Multicast = field(default_factory=Multicast)
    # [publish] boot_test: new image generations boot in QEMU before they become current.
    boot_test: bool = False
    boot_test_timeout: float = 240.0
    # What the loader made each host of (site/load.py, "origins"), by the host object's id:
    # two hosts of one origin are equal, so a bundle key hashes it instead of every field.
    # Trusted for that very object only (see origin): a Host made any other way, by
    # dataclasses.replace too, is another object and has none. Each entry holds its host, so
    # the id cannot pass to another object while the mapping lives.
    host_origins: Mapping[int, tuple[Host, str]] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )

    def origin(self, host: Host) -> str:
        """The host's origin if it is a host as this site loaded it, else ""."""
        entry = self.host_origins.get(id(host))
        return entry[1] if entry is not None and entry[0] is host else ""

    def host_chroot(self, host: Host) -> Chroot | None:
        """The node's own chroot option overrides its image's chroot."""
        name = (
            host.options.get("chroot")
            or self.images[self.bootconfigs[host.bootconfig].image].chroot
        )
        return self.chroots[name] if name else None

    @property
    def boot_network(self) -> Network:
        return next(n for n in self.networks.values() if n.boot)

    @property
    def http_base(self) -> str:
        port = "" if self.http_port == 80 else f":{self.http_port}"
        return f"http://{self.head_address}{port}"

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        known = ", ".join(h.name for h in self.hosts) or "none"
        raise ConfigError([f"unknown node {name!r} (nodes in nodes.d: {known})"])

    def relative(self, path: Path) -> str:
        """A path as messages name it: relative to the site root when it is below it."""
        try:
            return str(path.relative_to(self.paths.root))
        except ValueError:
            return str(path)

    def boot_address(self, host: Host) -> str:
        addr = host.address_on(self.boot_network.name)
        assert addr is not None  # checked when the site was loaded
        return addr.address
