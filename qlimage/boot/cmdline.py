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
    ]
    return " ".join([*args, *bootconfig.append.split()])
