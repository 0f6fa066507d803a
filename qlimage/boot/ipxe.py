"""iPXE: a dispatch script `boot.ipxe` in the TFTP root and one script per host, by MAC, that
fetches kernel and initrd over HTTP (for sites whose NICs run iPXE or that chain-load it).

iPXE splits a command line at white space and expands `${...}` everywhere; it has no quoting.
So a value is written only when it is one word iPXE reads back as it is: anything else is
refused (the schemas keep such values out of the site first).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from qlimage import contract, templates
from qlimage.atomic import write_text
from qlimage.boot import perhost
from qlimage.boot.cmdline import kernel_command_line
from qlimage.site import BootConfig, Host, Site

DISPATCH = "boot.ipxe"  # the boot file: a script iPXE runs when DHCP names it
SUFFIX = ".ipxe"
DIRECTORY = "ipxe"  # below the TFTP root (Layout.ipxe_dir)
# What iPXE takes literally in a word: no white space, `$` (settings), `#` (comment), `||`/`&&`
# (command chains), `:` at a word's start (a label) or a quote.
WORD = re.compile(r"[A-Za-z0-9._,/=+@%:()\[\]-]+")


def word(value: object) -> str:
    text = str(value)
    if not WORD.fullmatch(text) or text.startswith(":"):
        raise templates.UnsafeValue(f"{text!r}: iPXE has no quoting for this value")
    return text


def host_script_name(host: Host) -> str:
    """`<mac with dashes>.ipxe`: what `${mac:hexhyp}` expands to in the dispatch script."""
    return mac_script_name(host.mac.lower().replace(":", "-"))


def mac_script_name(mac: str) -> str:
    return mac + SUFFIX


def render_host(site: Site, bootconfig: BootConfig, host: Host) -> str:
    """The host's script: the full render."""
    return render_mac(site, bootconfig, host.mac.lower().replace(":", "-"))


def render_mac(site: Site, bootconfig: BootConfig, mac: str) -> str:
    """The script of a host whose MAC with dashes is `mac` (perhost.shape's slot)."""
    name = mac_script_name(mac)
    words = kernel_command_line(site, bootconfig, name).split()
    words.append(contract.cmdline_arg(contract.CMDLINE_BOOTIF, "01-" + mac))
    base = f"{site.http_base}/"
    return templates.render(
        "boot/ipxe-host.ipxe.j2",
        banner=[word(w) for w in ("qlustar:", "ipxe", "script", name, "boot", "config")]
        + [word(bootconfig.name)],
        kernel=word(base + contract.boot_path(contract.KERNEL_FILE)),
        initrd=word(base + contract.boot_path(contract.INITRD_FILE)),
        args=[word(w) for w in words],
    )


def scripts(site: Site) -> perhost.Files:
    """{file name below ipxe/: content}: one script per host whose command line iPXE can
    carry. A host whose boot config's `append` it cannot (`$`, quotes, ...) gets none and a
    warning: pxelinux and GRUB boot it as before, and the site's other loaders still build.
    One render per boot config (perhost.shape); a host's script is that text with its MAC
    filled in, or, where that is not sure to be the same (a refused boot config among
    them), its own full render."""
    out = perhost.Files()
    shaped_name = ("", mac_script_name(""))
    rest = out.put_hosts(site.hosts, lambda b: host_shape(site, site.bootconfigs[b]), shaped_name)
    for h in rest:
        try:
            out.put(host_script_name(h), render_host(site, site.bootconfigs[h.bootconfig], h))
        except templates.UnsafeValue as e:
            print(
                f"qlimage: warning: site.toml: .bootconfigs.{h.bootconfig}.append: {e}; "
                f"no iPXE script for {h.name}",
                file=sys.stderr,
            )
    return out


def host_shape(site: Site, bootconfig: BootConfig) -> perhost.Shape | None:
    return perhost.shape(lambda mac: render_mac(site, bootconfig, mac))


def dispatch() -> str:
    return templates.render("boot/ipxe-dispatch.ipxe.j2", directory=DIRECTORY, suffix=SUFFIX)


def write_scripts(rendered: dict[str, str], dispatch_text: str, tftpboot: Path) -> None:
    """The dispatch script and exactly `rendered` in ipxe/, rewriting only the scripts that
    changed: a host that left loses its own."""
    write_text(tftpboot / DISPATCH, dispatch_text)
    perhost.write_changed(tftpboot / DIRECTORY, rendered, lambda name: name.endswith(SUFFIX))
