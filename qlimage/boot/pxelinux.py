"""pxelinux: the TFTP tree, one config per boot config, `default`, and per-host HOSTID links."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path

from qlimage import contract, pieces, templates
from qlimage.atomic import atomic_path, symlink, write_text
from qlimage.boot.cmdline import kernel_command_line
from qlimage.errors import ToolMissing
from qlimage.site import BootConfig, Host, Site, addresses_on

# Where Debian's pxelinux and syslinux-common packages put the BIOS PXE loader and its library.
PXELINUX = Path("/usr/lib/PXELINUX/pxelinux.0")
LDLINUX = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
KERNEL_PATH = contract.boot_path(contract.KERNEL_FILE)  # relative to the TFTP root
INITRD_PATH = contract.boot_path(contract.INITRD_FILE)
HOSTS_INDEX = ".hosts"
# An IPv4 address in canonical dotted-quad form (each octet 0-255 without leading zeros, ASCII
# digits only): every loaded host's. socket.inet_aton also reads forms ipaddress refuses
# ("10.1", "0x0a.0.0.1", "010.0.0.1"), so it sees only this one, where both agree.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
CANONICAL_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


def hostid(address: str) -> str:
    """The file name pxelinux tries for a client: its IPv4 address in upper-case hex."""
    if CANONICAL_IPV4.fullmatch(address):  # a tenth of ipaddress's cost, at 10,000 hosts
        return socket.inet_aton(address).hex().upper()
    return f"{int(ipaddress.IPv4Address(address)):08X}"  # decides (and refuses) the rest


def render_config(site: Site, bootconfig: BootConfig | None, config_name: str) -> str:
    if bootconfig is None:
        return templates.render("boot/pxelinux-unregistered.cfg.j2", serial=site.serial)
    return templates.render(
        "boot/pxelinux.cfg.j2",
        serial=site.serial,
        config_name=config_name,
        bootconfig=bootconfig,
        kernel=KERNEL_PATH,
        initrd=INITRD_PATH,
        append=kernel_command_line(site, bootconfig, config_name),
    )


def configs(site: Site) -> dict[str, str]:
    """{file name in pxelinux.cfg: content}: `default` plus one file per boot config."""
    out = {name: render_config(site, bc, name) for name, bc in site.bootconfigs.items()}
    default = site.bootconfigs.get(site.default_bootconfig or "")
    out["default"] = render_config(site, default, "default")
    return out


def host_links(site: Site) -> dict[str, str]:
    """{HOSTID: boot config file name} for every host, each HOSTID kept between builds
    (qlimage.pieces)."""
    boot = site.boot_network.name  # once, not per host as site.boot_address(h) does
    [ids] = pieces.of(site).made("pxelinux", boot, 1, lambda hosts: hostids(hosts, boot))
    return dict(zip(ids, [h.bootconfig for h in site.hosts], strict=True))


def hostids(hosts: list[Host], boot: str) -> list[tuple[str]]:
    return [(hostid(a.address),) for a in addresses_on(hosts, boot)]


def write_configs(site: Site, directory: Path) -> None:
    for name, text in configs(site).items():
        write_text(directory / name, text)


def write_links(links: Mapping[str, str], directory: Path) -> None:
    """Make the HOSTID links exactly `links`: create, retarget, and remove stale ones (those
    the index names). With the outputs as the stamped build left them (tasks/stamp.py, which
    keys the index itself too), a link is what the index says it is: only links whose entry
    changed are looked at, not 10,000 for one node's new address."""
    from qlimage.tasks import stamp

    directory.mkdir(parents=True, exist_ok=True)
    index = directory / HOSTS_INDEX
    old = read_index(index)
    trusted = stamp.outputs_trusted()
    for name, target in sorted(links.items()):
        if trusted and old.get(name) == target:
            continue
        link = directory / name
        if not (link.is_symlink() and os.readlink(link) == target):
            symlink(link, target)
    for name in sorted(old.keys() - links.keys()):
        (directory / name).unlink(missing_ok=True)
    write_text(index, "".join(f"{k} {v}\n" for k, v in sorted(links.items())))


# What hostid() makes: only names of this form are ever removed as stale links.
HOSTID = re.compile(r"[0-9A-F]{8}")


def read_index(index: Path) -> dict[str, str]:
    """{HOSTID: boot config} as the index lists them (a missing index: none)."""
    try:
        words = index.read_text().split()
    except FileNotFoundError:
        return {}
    pairs = zip(words[::2], words[1::2], strict=False)  # a torn last entry: no target
    return {k: v for k, v in pairs if HOSTID.fullmatch(k)}


def install_tftp_tree(tftpboot: Path) -> None:
    """pxelinux.0 and ldlinux.c32 from the host's packages, plus the seed's two links."""
    for src, pkg in ((PXELINUX, "pxelinux"), (LDLINUX, "syslinux-common")):
        if not src.exists():
            raise ToolMissing(f"{src}: not found", hint=f"apt-get install {pkg}")
        with atomic_path(tftpboot / src.name) as tmp:
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o644)
    symlink(tftpboot / "pxelinux.cfg", "../pxelinux.cfg")
    symlink(tftpboot / "qlustar", "../qlustar")
