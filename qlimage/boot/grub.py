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

Kernel and initrd come over TFTP unless the boot config says `grub_fetch = "http"`. Debian's
signed grubnetx64 has no `http` module built in (its modules: `tftp`, `efinet`, no `http`), and
GRUB 2.06's `http` connects to port 80 of `(http,<server>)` only, with no syntax for a port. So
an HTTP config runs `insmod http`, which loads `grub/x86_64-efi/http.mod` from the TFTP prefix
(copied from `grub-efi-amd64-bin` of exactly the signed image's build), then tries each source
in turn: `(http,<server>)`, then `(tftp)`. Under Secure Boot GRUB refuses modules it did not
embed ("prohibited by secure boot policy"), so those nodes fall back to TFTP by themselves.
"""

from __future__ import annotations

import re
from pathlib import Path

from qlimage import contract, templates
from qlimage.boot import loaders, perhost
from qlimage.boot.cmdline import kernel_command_line
from qlimage.errors import BuildError
from qlimage.layout import Layout
from qlimage.site import BootConfig, Host, Site

CONFIG = "grub.cfg"
KERNEL_PATH = f"/{contract.boot_path(contract.KERNEL_FILE)}"  # from the TFTP or HTTP root
INITRD_PATH = f"/{contract.boot_path(contract.INITRD_FILE)}"
KERNEL = f"(tftp){KERNEL_PATH}"
INITRD = f"(tftp){INITRD_PATH}"

# GRUB's insmod looks in $prefix/<cpu>-<platform>/ (Layout.grub_modules) for http.mod.
MODULE_PACKAGE = "grub-efi-amd64-bin"
MODULE_DIR = "x86_64-efi"  # in the package: usr/lib/grub/x86_64-efi/
HTTP_MODULE = "http.mod"
SIGNED_PACKAGE = "grub-efi-amd64-signed"
# The SBAT entry Debian puts in its signed GRUB: `grub.debian,<gen>,Debian,grub2,<version>,<url>`.
SBAT_DEBIAN = re.compile(rb"^grub\.debian,\d+,Debian,grub2,([0-9A-Za-z.+~:-]+),", re.MULTILINE)


def quote(value: object) -> str:
    """One GRUB script word: single-quoted, so `$`, `;`, `#`, quotes and white space are taken
    literally (a `'` becomes `'\\''`). GRUB has no escape for a line break: refused."""
    text = templates.line(value)
    return "'" + text.replace("'", "'\\''") + "'"


def bootif(host: Host) -> str:
    """`01-<mac with dashes>`: ARP type 1 (ethernet), as pxelinux's IPAPPEND 2 gives it."""
    return mac_bootif(host.mac.lower().replace(":", "-"))


def mac_bootif(mac: str) -> str:
    return "01-" + mac


def host_config_name(host: Host) -> str:
    return f"{CONFIG}-{bootif(host)}"


def mac_config_name(mac: str) -> str:
    return f"{CONFIG}-{mac_bootif(mac)}"


def render_config(
    site: Site, bootconfig: BootConfig | None, config_name: str, host: Host | None = None
) -> str:
    """The default config (no host) or `host`'s own, named `config_name`: the full render."""
    return render(site, bootconfig, config_name, None if host is None else bootif(host))


def render_mac_config(site: Site, bootconfig: BootConfig, mac: str) -> str:
    """The config of a host whose MAC with dashes is `mac` (perhost.shape's slot)."""
    return render(site, bootconfig, mac_config_name(mac), mac_bootif(mac))


def render(
    site: Site, bootconfig: BootConfig | None, config_name: str, host_bootif: str | None
) -> str:
    if bootconfig is None:
        banner = f"qlustar: grub config {config_name}: no boot config on the head, leaving GRUB"
        return templates.render(
            "boot/grub-unregistered.cfg.j2", banner=quote(banner), dispatch=True, config=CONFIG
        )
    words = kernel_command_line(site, bootconfig, config_name).split()
    if host_bootif is not None:
        words.append(contract.cmdline_arg(contract.CMDLINE_BOOTIF, host_bootif))
    banner = f"qlustar: grub config {config_name} (boot config {bootconfig.name})"
    return templates.render(
        "boot/grub.cfg.j2",
        bootconfig=bootconfig,
        banner=quote(banner),
        kernel=quote(KERNEL),
        initrd=quote(INITRD),
        sources=[quote(s) for s in sources(site, bootconfig)],
        kernel_path=quote(KERNEL_PATH),
        initrd_path=quote(INITRD_PATH),
        args=[quote(w) for w in words],
        dispatch=host_bootif is None,  # only the default config looks for a host's own
        config=CONFIG,
    )


def http_server(site: Site, bootconfig: BootConfig) -> str:
    """The address GRUB fetches from over HTTP, always on port 80: the head's only when it
    serves port 80 (site loading refuses HTTP otherwise, unless another address is named)."""
    return bootconfig.grub_http_server or site.head_address


def sources(site: Site, bootconfig: BootConfig) -> list[str]:
    """The GRUB devices kernel and initrd are tried from, in order; empty for a TFTP-only
    config, which keeps its plain three lines."""
    if bootconfig.grub_fetch != "http":
        return []
    return [f"(http,{http_server(site, bootconfig)})", "(tftp)"]


def wants_http_module(site: Site) -> bool:
    return any(b.grub_fetch == "http" for b in site.bootconfigs.values())


def http_module(layout: Layout) -> loaders.Loader:
    """http.mod of grub-efi-amd64-bin, where the signed GRUB's insmod finds it."""
    return loaders.Loader(
        MODULE_PACKAGE,
        f"usr/lib/grub/{MODULE_DIR}/{HTTP_MODULE}",
        str((layout.grub_modules / HTTP_MODULE).relative_to(layout.tftpboot)),
    )


def signed_grub(layout: Layout) -> Path:
    (loader,) = (x for x in loaders.LOADERS if x.package == SIGNED_PACKAGE)
    return layout.tftpboot / loader.name


def signed_grub_version(image: Path) -> str:
    """The grub2 build a Debian-signed GRUB image comes from, read from its SBAT section."""
    found = SBAT_DEBIAN.search(image.read_bytes())
    if found is None:
        raise BuildError(f"{image}: no Debian SBAT entry (grub.debian): not Debian's signed GRUB")
    return found.group(1).decode()


def install_http_module(site: Site) -> None:
    """Put http.mod beside the configs, from the same grub2 build as the signed image: GRUB
    links a module against its own symbols, and one from another build may not load (or
    worse). A mismatch (a mirror between two uploads) stops the build instead."""
    from qlimage.pool.mirror import open_archive  # the archive client pulls in requests

    layout = Layout(site)
    wanted = signed_grub_version(signed_grub(layout))
    have = open_archive(site).package(MODULE_PACKAGE).version
    if have != wanted:
        raise BuildError(
            f"{MODULE_PACKAGE} {have} does not match the signed GRUB's build {wanted}"
            f" ({signed_grub(layout).name}): GRUB's http module must come from the same build"
        )
    loaders.install_loaders(site, (http_module(layout),))


def configs(site: Site) -> perhost.Files:
    """{file name in grub/: content}: `grub.cfg` (the default boot config, else a config that
    returns to the firmware) plus `grub.cfg-01-<mac>` per host. One render per boot config
    (perhost.shape); a host's config is that text with its MAC filled in."""
    default = site.bootconfigs.get(site.default_bootconfig or "")
    out = perhost.Files()
    out.put(CONFIG, render_config(site, default, CONFIG))
    shaped_name = (mac_config_name(""), "")
    rest = out.put_hosts(site.hosts, lambda b: host_shape(site, site.bootconfigs[b]), shaped_name)
    for host in rest:
        name = host_config_name(host)
        out.put(name, render_config(site, site.bootconfigs[host.bootconfig], name, host))
    return out


def host_shape(site: Site, bootconfig: BootConfig) -> perhost.Shape | None:
    return perhost.shape(lambda mac: render_mac_config(site, bootconfig, mac))


def write_configs(rendered: dict[str, str], directory: Path) -> None:
    """Make the GRUB configs in `directory` exactly `rendered`, rewriting only those that
    changed: a host that left the site (or changed its MAC) loses its config in the same build."""
    perhost.write_changed(directory, rendered, lambda name: name.startswith(CONFIG))
