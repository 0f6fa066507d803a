"""GRUB network boot (UEFI): `grub/grub.cfg` and one config per host, under the names GRUB's
network boot looks up itself, generated from the same boot configs as pxelinux.

With its prefix on TFTP, GRUB's normal mode tries `grub.cfg-01-<mac with dashes>`, then
`grub.cfg-<HEX IP>` and its shorter prefixes, then `grub.cfg`. Debian's signed grubnetx64
(prefix `(tftp,<server>)/grub`) does not: its built-in config sources `grub.cfg` directly. So
`grub.cfg` first looks for `grub.cfg-01-<mac>` of the NIC GRUB booted from (`$net_default_mac`,
split with `regexp`, a built-in command of that image) and hands over to it; a GRUB that does
search finds the same file itself. A host's config is named by its boot MAC, the first name
GRUB tries, and hands the initrd `BOOTIF=01-<mac>` (as pxelinux's IPAPPEND 2 does) written
literally. The default config has no BOOTIF: the initrd then takes the first ethernet NIC.
"""

from __future__ import annotations

import os
from pathlib import Path

from qlimage import contract, templates
from qlimage.atomic import write_text
from qlimage.boot.cmdline import kernel_command_line
from qlimage.site import BootConfig, Host, Site

CONFIG = "grub.cfg"
KERNEL = f"(tftp)/{contract.boot_path(contract.KERNEL_FILE)}"  # from the TFTP root
INITRD = f"(tftp)/{contract.boot_path(contract.INITRD_FILE)}"


def quote(value: object) -> str:
    """One GRUB script word: single-quoted, so `$`, `;`, `#`, quotes and white space are taken
    literally (a `'` becomes `'\\''`). GRUB has no escape for a line break: refused."""
    text = templates.line(value)
    return "'" + text.replace("'", "'\\''") + "'"


def bootif(host: Host) -> str:
    """`01-<mac with dashes>`: ARP type 1 (ethernet), as pxelinux's IPAPPEND 2 gives it."""
    return "01-" + host.mac.lower().replace(":", "-")


def host_config_name(host: Host) -> str:
    return f"{CONFIG}-{bootif(host)}"


def render_config(
    site: Site, bootconfig: BootConfig | None, config_name: str, host: Host | None = None
) -> str:
    if bootconfig is None:
        banner = f"qlustar: grub config {config_name}: no boot config on the head, leaving GRUB"
        return templates.render(
            "boot/grub-unregistered.cfg.j2", banner=quote(banner), dispatch=True, config=CONFIG
        )
    words = kernel_command_line(site, bootconfig, config_name).split()
    if host is not None:
        words.append(contract.cmdline_arg(contract.CMDLINE_BOOTIF, bootif(host)))
    banner = f"qlustar: grub config {config_name} (boot config {bootconfig.name})"
    return templates.render(
        "boot/grub.cfg.j2",
        bootconfig=bootconfig,
        banner=quote(banner),
        kernel=quote(KERNEL),
        initrd=quote(INITRD),
        args=[quote(w) for w in words],
        dispatch=host is None,  # only the default config looks for a host's own
        config=CONFIG,
    )


def configs(site: Site) -> dict[str, str]:
    """{file name in grub/: content}: `grub.cfg` (the default boot config, else a config that
    returns to the firmware) plus `grub.cfg-01-<mac>` per host."""
    default = site.bootconfigs.get(site.default_bootconfig or "")
    out = {CONFIG: render_config(site, default, CONFIG)}
    for host in site.hosts:
        name = host_config_name(host)
        out[name] = render_config(site, site.bootconfigs[host.bootconfig], name, host)
    return out


def write_configs(rendered: dict[str, str], directory: Path) -> None:
    """Make the GRUB configs in `directory` exactly `rendered`: a host that left the site (or
    changed its MAC) loses its config in the same build."""
    for name, text in sorted(rendered.items()):
        write_text(directory / name, text)
    for entry in os.scandir(directory):
        if entry.name.startswith(CONFIG) and entry.name not in rendered:
            os.unlink(entry.path)  # a name in this directory: a link is removed, not followed
