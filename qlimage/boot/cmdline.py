"""The kernel command line every boot loader gives a node: what the initrd and runner read."""

from __future__ import annotations

from qlimage import contract as c
from qlimage.site import BootConfig, Site


def kernel_command_line(site: Site, bootconfig: BootConfig, config_name: str) -> str:
    """`config_name` is the loader config that booted (pxelinux: `default` or a HOSTID link)."""
    args = [
        f"console={site.console}",
        c.cmdline_arg(c.CMDLINE_HTTP, f"{site.http_base}/{c.QLUSTAR_DIR}"),
        c.cmdline_arg(c.CMDLINE_IMAGE, bootconfig.image),
        c.cmdline_arg(c.CMDLINE_PATH, c.image_path(bootconfig.image)),
        c.cmdline_arg(c.CMDLINE_SUM, c.image_sum_file(bootconfig.image)),
        c.cmdline_arg(c.CMDLINE_BOOTCFG, bootconfig.name),
        c.cmdline_arg(c.CMDLINE_PXECFG, config_name),
        *multicast_args(site),
    ]
    return " ".join([*args, *bootconfig.append.split()])


def multicast_args(site: Site) -> list[str]:
    """qlustar.mcast=<address>:<port> of ql-mcastd, when multicast is on: on the command line,
    not in the initrd, so moving the daemon never needs a new initrd. A boot config's `append`
    comes later and wins: `qlustar.mcast=off` there forces unicast for its nodes."""
    mc = site.multicast
    if not mc.enabled:
        return []
    return [c.cmdline_arg(c.CMDLINE_MCAST, f"{mc.address}:{int(mc.port)}")]
