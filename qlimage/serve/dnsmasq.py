"""The head's dnsmasq config: DHCP for registered nodes only, and the TFTP tree.

DHCP answers exactly the MACs of nodes.d on the boot network, each with its address and host
name (a static range: nothing is handed out dynamically, and unknown clients are ignored). The
boot file follows the DHCP client architecture (option 93): BIOS gets pxelinux.0, EFI x86-64
Debian's signed shim; hosts whose boot config chain-loads iPXE get iPXE first, then its script.

DNS is off by default (`port=0`): a head node usually runs a resolver on port 53 already, and a
second server there would fail to start or shadow it. `[head] serve_dns = true` lets dnsmasq
answer for node names (from the dhcp-host lines) on the head address.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from qlimage import pieces, templates
from qlimage.boot import ipxe
from qlimage.layout import Layout
from qlimage.serve import values
from qlimage.site import Host, Site, addresses_on

# DHCP client architectures (RFC 4578 option 93) -> dnsmasq tag; the tag names stay stable so
# the UEFI loaders only add `dhcp-boot=tag:<tag>,<loader>` lines.
ARCH_TAGS = (
    (0, "bios"),  # x86 BIOS
    (7, "efi-x86_64"),  # EFI x86-64 (byte code in early firmware)
    (9, "efi-x86_64"),  # EFI x86-64
)
BOOT_FILES = {"bios": "pxelinux.0"}  # tag -> file below the TFTP root
# Hosts whose boot config says `loader = "ipxe"` carry IPXE_HOST_TAG (set by their dhcp-host
# line). Their firmware gets iPXE by architecture; iPXE itself (its requests carry option 175)
# gets the dispatch script, which chains the host's own script.
IPXE_HOST_TAG = "ipxe-host"
IPXE_CLIENT_TAG = "ipxe"
IPXE_OPTION = 175
IPXE_BOOT_FILES = {"bios": "undionly.kpxe", "efi-x86_64": "snponly.efi"}
BOOT_TAG = "boot"  # set for clients on the boot network's range
LEASE_TIME = "12h"
LEASE_MAX_MIN = 1000  # dnsmasq's own default
TFTP_MAX = 1000  # concurrent TFTP transfers (dnsmasq's default 50 is too few for a boot storm)
LEASES = "dnsmasq.leases"
PID = "dnsmasq.pid"


@dataclass(frozen=True)
class DhcpHost:
    mac: str
    address: str
    hostname: str
    name: str  # the nodes.d host, for the comment
    ipxe: bool = False  # its boot config chain-loads iPXE


def dhcp_hosts(site: Site) -> list[DhcpHost]:
    boot = site.boot_network.name
    ipxe_configs = ipxe_bootconfigs(site)
    out = []
    for host in site.hosts:
        addr = host.address_on(boot)
        assert addr is not None  # checked when the site was loaded
        out.append(
            DhcpHost(
                values.mac(host.mac),
                values.ipv4(addr.address),
                values.hostname(addr.hostname),
                values.hostname(host.name),
                host.bootconfig in ipxe_configs,
            )
        )
    return out


def ipxe_bootconfigs(site: Site) -> frozenset[str]:
    return frozenset(name for name, b in site.bootconfigs.items() if b.loader == "ipxe")


def host_lines(site: Site) -> tuple[str, bool]:
    """(the dhcp-host lines, whether one sets the iPXE tag): what dhcp_hosts() says, with the
    same checks, each host's line kept between builds (qlimage.pieces): made here rather
    than by a loop in the template, which costs ten times as much at 10,000 hosts."""
    boot = site.boot_network.name
    ipxe_configs = ipxe_bootconfigs(site)
    [lines] = pieces.of(site).made(
        "dnsmasq",
        (boot, sorted(ipxe_configs)),
        1,
        lambda hosts: dhcp_host_lines(hosts, boot, ipxe_configs),
    )
    any_ipxe = bool(ipxe_configs) and any(h.bootconfig in ipxe_configs for h in site.hosts)
    return "".join(lines), any_ipxe


def dhcp_host_lines(hosts: list[Host], boot: str, ipxe_configs: frozenset[str]) -> list[tuple[str]]:
    """Each host's dhcp-host line, the values checked a column at a time."""
    addrs = addresses_on(hosts, boot)
    macs = values.checked([h.mac for h in hosts], values.MAC, values.mac)
    ips = values.checked([a.address for a in addrs], values.CANONICAL_IPV4, values.ipv4)
    names = values.checked([a.hostname for a in addrs], values.HOSTNAME, values.hostname)
    # No line names the inventory name, but dhcp_hosts() refuses a bad one: so does this
    # (most hosts have no hostname of their own on the boot network: checked just above).
    if (inventory := [h.name for h in hosts]) != names:
        values.checked(inventory, values.HOSTNAME, values.hostname)
    tags = [f"set:{IPXE_HOST_TAG}," if h.bootconfig in ipxe_configs else "" for h in hosts]
    return [
        (f"dhcp-host={m},{t}{a},{n}\n",) for m, t, a, n in zip(macs, tags, ips, names, strict=True)
    ]


def render(site: Site) -> str:
    layout = Layout(site)
    net = site.boot_network
    head = values.ipv4(site.head_address)
    lines, any_ipxe = host_lines(site)
    return templates.render(
        "serve/dnsmasq.conf.j2",
        site_name=site.name,
        head=head,
        serve_dns=site.serve_dns,
        run_dir=values.config_path(layout.head_run),
        pid=PID,
        leases=LEASES,
        tftp_root=values.config_path(layout.tftpboot),
        tftp_max=TFTP_MAX,
        network=net.name,
        network_address=str(net.cidr.network_address),
        netmask=str(net.cidr.netmask),
        boot_tag=BOOT_TAG,
        lease_time=LEASE_TIME,
        lease_max=max(LEASE_MAX_MIN, 2 * len(site.hosts)),
        router=values.ipv4(net.gateway) if net.gateway else None,
        dns=[values.ipv4(a) for a in site.dns_servers] or [head],
        mtu=net.mtu,
        host_lines=lines,
        arch_tags=ARCH_TAGS,
        boot_files=BOOT_FILES,
        ipxe_host_tag=IPXE_HOST_TAG,
        ipxe_client_tag=IPXE_CLIENT_TAG,
        ipxe_option=IPXE_OPTION,
        ipxe_boot_files=IPXE_BOOT_FILES if any_ipxe else {},
        ipxe_dispatch=ipxe.DISPATCH,
        on_boot_network=ipaddress.IPv4Address(head) in net.cidr,
    )
