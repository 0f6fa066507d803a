"""Per-node configuration bundles: everything a node receives at boot, as one JSON document.

QluMan execd writes a node's configuration in the pre-systemd boot phase from the options the
head assigns to it; here the head renders all of it ahead of time into a *bundle* that the
node runner (qlimage/node/runner, `qlustar-runner` on the node) fetches, verifies and applies.
`render_bundle` is the one function that computes what a node receives; `qlimage preview`
shows it with `describe`, and `diff` compares it with the bundle published before.

What a bundle holds, per option kind of the host's effective options (`Host.options`):

* always: `/etc/hostname`, the action `hostname`, and `/etc/qlustar/options.d/node` (name,
  MAC, address per network, image, flavor, boot config as shell-sourceable KEY=value lines);
* `network`: `/etc/network/interfaces.d/qluman` (ifupdown) for Debian/Ubuntu flavors, or one
  `/etc/sysconfig/network-scripts/ifcfg-<dev>` per device for RHEL-like flavors (FLAVOR_FAMILIES);
* `disk`: `/etc/qlustar/options.d/disk-config` (line format documented in its header);
* `mounts`: a systemd `.mount` unit per mount (plus an `.automount` unit with `automount`) in
  /etc/systemd/system, enabled the way `systemctl enable` does it: a symlink in
  `remote-fs.target.wants/` (network file systems) or `local-fs.target.wants/` (others);
* `opensm`: `/etc/qlustar/options.d/opensm` and, when on, the `opensm.service` wants link;
* `ipmi`: `/etc/qlustar/options.d/ipmi` and the action `ipmi`;
* `chroot`: `/etc/qlustar/options.d/chroot`;
* `authorized_keys`: `/root/.ssh` (0700) and `/root/.ssh/authorized_keys` (0600), the site's
  `ssh/authorized_keys.header` first (with that header, every node gets the file; the
  cluster's ssh_known_hosts and shosts.equiv are not in bundles: `sshfiles.py`);
* `rootfs`: every file, directory and symlink below `rootfs/<config>/` for each config in
  order, with the mode, owner and group it has on the head;
* `mail`: `/etc/qlustar/options.d/mail` and a `command` action running `postconf`;
* `pam_slurm`: `/etc/qlustar/options.d/pam-slurm` and an `ensure-line` action for
  /etc/pam.d/sshd;
* `time` (on for every node unless `enabled = false`; servers default to the head's address):
  `/etc/qlustar/options.d/time` (read by the runner, which sets the clock from it before it
  writes anything), `/etc/chrony/conf.d/qlustar.conf` and
  `/etc/systemd/timesyncd.conf.d/qlustar.conf` (both always: each is read only by its own
  daemon, so the bundle does not depend on which one the image carries);
* `sssd`: `/etc/sssd/sssd.conf` (0600), the `sssd.service` wants link, `/etc/nsswitch.conf`
  and `command` actions running pam-auth-update (when the image has the sss profile);
* `nis`: `/etc/defaultdomain`, `/etc/yp.conf` and `/etc/nsswitch.conf`. With both sssd and
  nis, nsswitch.conf lists `files sss nis` (sssd before NIS, always).

Layering: the generated files form the first layer, then each rootfs config in the host's
order; an entry of a later layer replaces the entry of the same path, and a non-directory
replacing a directory drops everything below it. So a Root FS Customization can override any
generated file. Directories that only need to exist (e.g. /etc/qlustar/options.d) are not
entries: the runner creates missing parents as 0755 root:root.

Order of `files`: sorted by path, component by component (so a directory always precedes its
contents), independent of the option or layer an entry came from. Order of `actions`:
hostname, ipmi, mail's command, pam_slurm's ensure-line, sssd's commands.

Action kinds and their fields (all fields present unless noted):
  {"kind": "hostname", "name"}
  {"kind": "ipmi", "address", "netmask", "gateway" ("" if the network has none), "channel"}
  {"kind": "command", "argv", "description", "if_exists" (optional: skip the action when
   this path does not exist on the node)}
  {"kind": "ensure-line", "path", "line"}: append `line` to the file at `path` unless the
   file already has exactly that line.
"""

from __future__ import annotations

import base64
import contextlib
import difflib
import errno
import functools
import grp
import hashlib
import json
import os
import pwd
import shlex
import stat
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from qlimage import contract, templates
from qlimage.bundle import sshfiles
from qlimage.errors import ConfigError, QlimageError
from qlimage.site import Host, Image, Network, Site
from qlimage.trees import walk

BUNDLE_FORMAT = contract.BUNDLE_FORMAT
OPTIONS_DIR = contract.OPTIONS_DIR
UNIT_DIR = "/etc/systemd/system"
INTERFACES_FILE = "/etc/network/interfaces.d/qluman"
IFCFG_DIR = "/etc/sysconfig/network-scripts"
OPENSM_SERVICE = "/lib/systemd/system/opensm.service"
POSTCONF = "/usr/sbin/postconf"
PAM_SSHD = "/etc/pam.d/sshd"
HOSTNAME_PATH = "/etc/hostname"
PAM_SLURM_LINE = "account    required     pam_slurm_adopt.so"
TIME_OPTION = "time"  # options.d file the runner reads (node/runner/paths.py: TIME_FILE)
CHRONY_CONF = "/etc/chrony/conf.d/qlustar.conf"
TIMESYNCD_CONF = "/etc/systemd/timesyncd.conf.d/qlustar.conf"
SSSD_CONF = "/etc/sssd/sssd.conf"
SSSD_SERVICE = "/lib/systemd/system/sssd.service"
NSSWITCH_CONF = "/etc/nsswitch.conf"
PAM_AUTH_UPDATE = "/usr/sbin/pam-auth-update"
PAM_CONFIGS = "/usr/share/pam-configs"
YP_CONF = "/etc/yp.conf"
DEFAULTDOMAIN = "/etc/defaultdomain"
# Name services after `files` in nsswitch.conf, in this fixed order (sssd before NIS).
NSS_SOURCES = (("sssd", "sss"), ("nis", "nis"))
# Options every node has unless its own options set them (kind -> value).
DEFAULT_OPTIONS: Mapping[str, Any] = MappingProxyType({"time": MappingProxyType({})})

DEBIAN = "debian"  # ifupdown: /etc/network/interfaces.d/
RHEL = "rhel"  # initscripts / NetworkManager ifcfg-rh: /etc/sysconfig/network-scripts/
# Image flavor -> the family that decides the network configuration format.
FLAVOR_FAMILIES: Mapping[str, str] = MappingProxyType(
    {
        **dict.fromkeys(("stretch", "buster", "bullseye", "bookworm", "trixie", "sid"), DEBIAN),
        **dict.fromkeys(("xenial", "bionic", "focal", "jammy", "noble"), DEBIAN),
        **dict.fromkeys(("el7", "el8", "el9", "centos7", "centos8", "centos9"), RHEL),
        **dict.fromkeys(("rocky8", "rocky9", "alma8", "alma9"), RHEL),
    }
)

# File system types mounted over the network: systemd's own list (fstype_is_network, a
# "fuse." prefix ignored) plus BeeGFS. Their units wait for network-online.target and are
# wanted by remote-fs.target; all others by local-fs.target.
NETWORK_FS_TYPES = frozenset(
    {
        "afs", "ceph", "cifs", "smb3", "smbfs", "sshfs", "ncpfs", "ncp", "nfs", "nfs4", "gfs",
        "gfs2", "glusterfs", "gpfs", "pvfs2", "ocfs2", "lustre", "davfs", "beegfs",
    }
)  # fmt: skip
DEFAULT_BOND_MODE = "balance-rr"  # the kernel's default, written out so the file says it
DEFAULT_BOND_MIIMON = 100  # without link monitoring a bond never notices a dead slave
DEFAULT_DISK_LABEL = contract.DEFAULT_DISK_LABEL
DEFAULT_DISK_WIPE = contract.DEFAULT_DISK_WIPE


@dataclass(frozen=True)
class NodeFile:
    """One entry of a bundle: a regular file, a directory or a symlink on the node."""

    path: str
    type: str  # "file" | "dir" | "symlink"
    mode: int
    owner: str
    group: str
    uid: int
    gid: int
    content: bytes = b""
    target: str = ""
    origin: str = ""  # what put it there, e.g. "mounts (optionset compute)"; not in the JSON


@dataclass(frozen=True)
class Bundle:
    node: str
    files: tuple[NodeFile, ...]
    actions: tuple[Mapping[str, Any], ...] = field(default=())


# --------------------------------------------------------------------------------------------
# Templates


def _render(template: str, **context: Any) -> str:
    return templates.render(f"bundle/{template}.j2", **context)


# --------------------------------------------------------------------------------------------
# systemd unit names


def systemd_escape_path(path: str) -> str:
    """Exactly what `systemd-escape --path PATH` prints (systemd's unit_name_path_escape):
    the path simplified (duplicate slashes, "." components and trailing slashes dropped), "-"
    for the root, else the leading slashes stripped, "/" turned into "-" and every byte that
    is not an ASCII letter, digit, ":" or "_" (nor a "." other than the first) as `\\xhh`.
    ValueError where systemd-escape fails (".." components, "." alone, a component longer
    than 255 bytes, a path of 4096 bytes or more, NUL)."""
    if "\0" in path:
        raise ValueError(f"{path!r}: contains NUL")
    absolute = path.startswith("/")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        if path == "" or absolute:
            return "-"
        raise ValueError(f"{path!r} is not a normalizable file system path")
    simplified = ("/" if absolute else "") + "/".join(parts)
    encoded = [p.encode("utf-8", "surrogateescape") for p in parts]
    if ".." in parts or any(len(p) > 255 for p in encoded) or len(simplified.encode()) >= 4096:
        raise ValueError(f"{path!r} is not a normalized file system path")
    out = []
    for i, byte in enumerate(b"/".join(encoded)):
        char = chr(byte)
        if char == "/":
            out.append("-")
        elif (char.isascii() and char.isalnum()) or char in ":_" or (char == "." and i > 0):
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Rendering


def _root_file(path: str, text: str, origin: str, mode: int = 0o644) -> NodeFile:
    return NodeFile(path, "file", mode, "root", "root", 0, 0, text.encode(), origin=origin)


def _root_dir(path: str, mode: int, origin: str) -> NodeFile:
    return NodeFile(path, "dir", mode, "root", "root", 0, 0, origin=origin)


def _root_link(path: str, target: str, origin: str) -> NodeFile:
    return NodeFile(path, "symlink", 0o777, "root", "root", 0, 0, target=target, origin=origin)


def _stanza(device: str, **settings: Any) -> dict[str, Any]:
    """One network device, format neutral (see _Renderer.interface_stanzas)."""
    stanza = {"device": device, "method": "manual", "address": "", "netmask": "", "prefix": "",
              "gateway": "", "mtu": None, "bond": None, "master": ""}  # fmt: skip
    stanza.update(settings)
    return stanza


class _Renderer:
    """Collects one host's files and actions; one method per option kind."""

    def __init__(self, site: Site, host: Host) -> None:
        self.site = site
        self.host = host
        self.image = host_image(site, host)
        self.files: list[NodeFile] = []
        self.actions: list[dict[str, Any]] = []

    def problem(self, kind: str, message: str) -> ConfigError:
        source = self.host.option_sources.get(kind, "default")
        return ConfigError(
            [f"{self.host.source}: host {self.host.name}: {kind} (from {source}): {message}"]
        )

    def origin(self, kind: str) -> str:
        return f"{kind} ({self.host.option_sources.get(kind, 'default')})"

    def context(self, kind: str) -> dict[str, Any]:
        """What every template gets: the node name and where the option came from."""
        return {"node": self.host.name, "kind": kind, "source": self.origin(kind)}

    def option_file(self, name: str, kind: str, **values: Any) -> None:
        text = _render(name, **self.context(kind), **values)
        self.files.append(_root_file(f"{OPTIONS_DIR}/{name}", text, self.origin(kind)))

    def network_of(self, name: str) -> tuple[Network, str]:
        net = self.site.networks[name]
        addr = self.host.address_on(name)
        assert addr is not None  # checked when the site was loaded
        return net, addr.address

    # --- always ---

    def identity(self) -> None:
        host = self.host
        hostname = _render("hostname", node=host.name)
        self.files.append(_root_file(HOSTNAME_PATH, hostname, "node"))
        self.actions.append({"kind": "hostname", "name": host.name})
        variables: dict[str, str] = {}
        networks: dict[str, str] = {}
        for a in host.addresses:
            var = "ADDRESS_" + a.network.upper().replace("-", "_")
            if var in variables:
                raise ConfigError(
                    [f"{host.source}: host {host.name}: networks {networks[var]!r} and "
                     f"{a.network!r} both give the variable {var} in {OPTIONS_DIR}/node"]
                )  # fmt: skip
            variables[var], networks[var] = a.address, a.network
        text = _render(
            "node",
            node=host.name,
            kind="node",
            source="the host's entry in " + host.source,
            mac=host.mac,
            image=self.image.name,
            flavor=self.image.flavor,
            bootconfig=host.bootconfig,
            networks=" ".join(a.network for a in host.addresses),
            addresses=variables,
        )
        self.files.append(_root_file(f"{OPTIONS_DIR}/node", text, "node"))

    # --- network ---

    def network(self, option: Mapping[str, Any]) -> None:
        family = flavor_family(self.host, self.image)
        stanzas = self.interface_stanzas(option["interfaces"])
        if family == DEBIAN:
            text = _render("interfaces", **self.context("network"), stanzas=stanzas)
            self.files.append(_root_file(INTERFACES_FILE, text, self.origin("network")))
            return
        for s in stanzas:
            text = _render("ifcfg", **self.context("network"), **s)
            path = f"{IFCFG_DIR}/ifcfg-{s['device']}"
            self.files.append(_root_file(path, text, self.origin("network")))

    def interface_stanzas(self, interfaces: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """One dict per device (bond slaves included), format neutral: device, method
        (static | dhcp | manual), address, netmask, prefix, gateway, mtu, bond, master."""
        stanzas: list[dict[str, Any]] = []
        seen: dict[str, str] = {}

        def claim(device: str, what: str) -> None:
            if device in seen:
                raise self.problem("network", f"device {device} is both {seen[device]} and {what}")
            seen[device] = what

        gateways: list[str] = []
        for iface in interfaces:
            device = iface["device"]
            claim(device, "an interface")
            s = _stanza(device, mtu=iface.get("mtu"))
            if "network" in iface:
                net, address = self.network_of(iface["network"])
                s["mtu"] = s["mtu"] or net.mtu
                if iface.get("dhcp"):
                    s["method"] = "dhcp"
                else:
                    s.update(
                        method="static",
                        address=address,
                        netmask=str(net.cidr.netmask),
                        prefix=str(net.cidr.prefixlen),
                    )
                    if net.gateway and iface.get("gateway", True):
                        s["gateway"] = net.gateway
                        gateways.append(device)
            elif iface.get("dhcp"):
                s["method"] = "dhcp"
            bond = iface.get("bond")
            if bond is not None:
                s["bond"] = {
                    "slaves": list(bond["slaves"]),
                    "mode": bond.get("mode", DEFAULT_BOND_MODE),
                    "miimon": bond.get("miimon", DEFAULT_BOND_MIIMON),
                }
            stanzas.append(s)
            for slave in bond["slaves"] if bond is not None else ():
                claim(slave, f"a slave of {device}")
                stanzas.append(_stanza(slave, master=device))
        if len(gateways) > 1:
            raise self.problem(
                "network",
                f"the default gateway would be set on {', '.join(gateways)}; "
                "set gateway = false on all interfaces but one",
            )
        return stanzas

    # --- disk ---

    def disk(self, option: Mapping[str, Any]) -> None:
        partitions = option["partitions"]
        lines = []
        for n, part in enumerate(partitions, 1):
            if part["size"] == "rest" and n != len(partitions):
                raise self.problem("disk", f"partition {n}: size 'rest' is only valid last")
            fields = [
                str(n),
                part["size"],
                part["fs"],
                disk_field(part.get("mount", "")),
                disk_field(part.get("label", "")),
                disk_field(part.get("options", "")),
            ]
            lines.append("part " + " ".join(fields))
        self.option_file(
            contract.DISK_CONFIG,
            "disk",
            device=disk_field(option["device"]),
            label=option.get("label", DEFAULT_DISK_LABEL),
            wipe=option.get("wipe", DEFAULT_DISK_WIPE),
            parts=lines,
        )

    # --- mounts ---

    def mounts(self, option: Sequence[Mapping[str, Any]]) -> None:
        origin = self.origin("mounts")
        seen: dict[str, str] = {}
        for m in option:
            # Simplified as systemd does (the schema rules out "." and ".." components).
            where = "/" + "/".join(part for part in m["where"].split("/") if part)
            if where == "/":
                raise self.problem("mounts", "cannot mount over /")
            for key in ("what", "where", "options"):
                value = where if key == "where" else m.get(key)
                message = check_unit_value(value)
                if message:
                    raise self.problem("mounts", f"{key}: {value!r} {message}")
            name = systemd_escape_path(where)
            if name in seen:
                raise self.problem("mounts", f"{where} is mounted twice ({seen[name]})")
            seen[name] = m["what"]
            fstype = m.get("type", "nfs")
            network = fstype.removeprefix("fuse.") in NETWORK_FS_TYPES
            target = "remote-fs.target" if network else "local-fs.target"
            automount = bool(m.get("automount"))
            context = {
                **self.context("mounts"),
                "what": m["what"],
                "where": where,
                "type": fstype,
                "options": m.get("options", ""),
                "network": network,
                "target": target,
                "automount": automount,
                "idle_timeout": m.get("idle_timeout"),
            }
            mount_unit = f"{name}.mount"
            self.files.append(
                _root_file(f"{UNIT_DIR}/{mount_unit}", _render("mount", **context), origin)
            )
            enabled = mount_unit
            if automount:
                enabled = f"{name}.automount"
                text = _render("automount", **context)
                self.files.append(_root_file(f"{UNIT_DIR}/{enabled}", text, origin))
            link = f"{UNIT_DIR}/{target}.wants/{enabled}"
            self.files.append(_root_link(link, f"{UNIT_DIR}/{enabled}", origin))

    # --- the small ones ---

    def opensm(self, option: bool) -> None:
        self.option_file("opensm", "opensm", enabled=option)
        if option:
            link = f"{UNIT_DIR}/multi-user.target.wants/opensm.service"
            self.files.append(_root_link(link, OPENSM_SERVICE, self.origin("opensm")))

    def ipmi(self, option: Mapping[str, Any]) -> None:
        net, address = self.network_of(option["network"])
        action = {
            "kind": "ipmi",
            "address": address,
            "netmask": str(net.cidr.netmask),
            "gateway": net.gateway or "",
            "channel": option.get("channel", 1),
        }
        self.actions.append(action)
        settings = {k: v for k, v in action.items() if k != "kind"}
        self.option_file("ipmi", "ipmi", network=net.name, **settings)

    def chroot(self, option: str) -> None:
        self.option_file("chroot", "chroot", chroot=option)

    def authorized_keys(self, option: Sequence[str]) -> None:
        origin = self.origin("authorized_keys")
        keys = [key.strip() for key in option]
        for key in keys:
            if any(c in "\r\n\0" for c in key):
                raise self.problem("authorized_keys", f"{key[:40]!r}...: not a single line")
        text = _render(
            "authorized_keys",
            **self.context("authorized_keys"),
            keys=keys,
            header=sshfiles.authorized_header(self.site),
            header_path=sshfiles.AUTHORIZED_KEYS_HEADER,
        )
        self.files.append(_root_dir("/root/.ssh", 0o700, origin))
        self.files.append(_root_file("/root/.ssh/authorized_keys", text, origin, 0o600))

    # --- always: the site's authorized_keys header (sshfiles.py) ---

    def ssh(self) -> None:
        # The header reaches every node, with the option or without. (The host files naming
        # every host are served once, not per bundle: the runner installs them.)
        if "authorized_keys" not in self.host.options and sshfiles.authorized_header(self.site):
            self.authorized_keys(())

    def mail(self, option: Mapping[str, Any]) -> None:
        relayhost = option["relayhost"]
        self.option_file("mail", "mail", relayhost=relayhost)
        self.actions.append(
            {
                "kind": "command",
                "argv": [POSTCONF, "-e", f"relayhost={relayhost}"],
                "description": f"postfix relay host {relayhost}",
                "if_exists": POSTCONF,
            }
        )

    def pam_slurm(self, option: bool) -> None:
        self.option_file("pam-slurm", "pam_slurm", enabled=option)
        if option:
            self.actions.append({"kind": "ensure-line", "path": PAM_SSHD, "line": PAM_SLURM_LINE})

    # --- time, sssd, nis ---

    def time(self, option: Mapping[str, Any]) -> None:
        if not option.get("enabled", True):
            return
        # The head's address is the default server: `qlimage serve` runs no NTP server, the
        # head runs chrony (README, Options of a node).
        servers = list(option.get("servers", [self.site.head_address]))
        sync = option.get("sync_at_boot", True)
        self.option_file(TIME_OPTION, "time", servers=servers, sync_at_boot=sync)
        for path, template in ((CHRONY_CONF, "chrony"), (TIMESYNCD_CONF, "timesyncd")):
            text = _render(template, **self.context("time"), servers=servers)
            self.files.append(_root_file(path, text, self.origin("time")))

    def sssd(self, option: Mapping[str, Any]) -> None:
        origin = self.origin("sssd")
        uris = list(option["uris"])
        context = {
            **self.context("sssd"),
            "provider": option.get("provider", "ldap"),
            "domain": option["domain"],
            "uris": uris,
            "all_ldaps": all(u.startswith("ldaps://") for u in uris),
            "search_base": option["search_base"],
            "tls_cacert": option.get("tls_cacert", ""),
            "bind_dn": option.get("bind_dn", ""),
            "access_filter": option.get("access_filter", ""),
        }
        # sssd refuses to start with a configuration readable by others.
        self.files.append(_root_file(SSSD_CONF, _render("sssd", **context), origin, 0o600))
        link = f"{UNIT_DIR}/multi-user.target.wants/sssd.service"
        self.files.append(_root_link(link, SSSD_SERVICE, origin))
        self.nsswitch()
        profiles = ["sss", "mkhomedir"] if option.get("mkhomedir") else ["sss"]
        for profile in profiles:
            self.actions.append(
                {
                    "kind": "command",
                    "argv": [PAM_AUTH_UPDATE, "--enable", profile],
                    "description": f"PAM profile {profile}",
                    "if_exists": f"{PAM_CONFIGS}/{profile}",
                }
            )

    def nis(self, option: Mapping[str, Any]) -> None:
        origin = self.origin("nis")
        context = {**self.context("nis"), "domain": option["domain"]}
        self.files.append(_root_file(DEFAULTDOMAIN, _render("defaultdomain", **context), origin))
        text = _render("yp", **context, servers=list(option["servers"]))
        self.files.append(_root_file(YP_CONF, text, origin))
        self.nsswitch()

    def nsswitch(self) -> None:
        """/etc/nsswitch.conf for every name service option the host has; rendered again
        (replacing the earlier one) by each such option, so the last one sees them all."""
        kinds = [(kind, nss) for kind, nss in NSS_SOURCES if kind in self.host.options]
        source = " + ".join(self.origin(kind) for kind, _ in kinds)
        text = _render(
            "nsswitch",
            node=self.host.name,
            kind="nsswitch",
            source=source,
            sources=[nss for _, nss in kinds],
        )
        self.files = [f for f in self.files if f.path != NSSWITCH_CONF]
        self.files.append(_root_file(NSSWITCH_CONF, text, source))


# Option kinds rendered into the first layer, in this order (the order actions are added in).
OPTION_KINDS = (
    "time",
    "network",
    "disk",
    "mounts",
    "opensm",
    "ipmi",
    "chroot",
    "authorized_keys",
    "mail",
    "pam_slurm",
    "sssd",
    "nis",
)


def host_image(site: Site, host: Host) -> Image:
    return site.images[site.bootconfigs[host.bootconfig].image]


def flavor_family(host: Host, image: Image) -> str:
    family = FLAVOR_FAMILIES.get(image.flavor)
    if family is None:
        known = ", ".join(sorted(FLAVOR_FAMILIES))
        raise ConfigError(
            [f"{host.source}: host {host.name}: image {image.name!r} has flavor "
             f"{image.flavor!r}, for which qlimage knows no network configuration format "
             f"(known flavors: {known})"]
        )  # fmt: skip
    return family


def disk_field(value: str) -> str:
    """A disk-config field: "-" when empty; whitespace, control characters, backslashes and a
    literal "-" as `\\0ooo` octal escapes (what `printf '%b'` decodes)."""
    if value == "":
        return "-"
    if value == "-":
        return "\\0055"
    out: list[str] = []
    for char in value:
        if char.isspace() or char == "\\" or ord(char) < 0x20 or ord(char) == 0x7F:
            out.extend(f"\\0{b:03o}" for b in char.encode())
        else:
            out.append(char)
    return "".join(out)


def check_unit_value(value: str | None) -> str:
    """Why `value` cannot be a systemd unit file setting, or "": a control character (a
    newline would start a new setting), surrounding whitespace (stripped by systemd) or a
    trailing backslash (a line continuation). `%` is escaped by the `unit` template filter."""
    if not value:
        return ""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return "contains a control character"
    if value != value.strip():
        return "has leading or trailing whitespace"
    if value.endswith("\\"):
        return "ends with a backslash"
    return ""


class _Ids:
    """The head's user and group names for numeric ids (the numbers as text when unknown)."""

    def __init__(self) -> None:
        self.users: dict[int, str] = {}
        self.groups: dict[int, str] = {}

    def user(self, uid: int) -> str:
        if uid not in self.users:
            try:
                self.users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self.users[uid] = str(uid)
        return self.users[uid]

    def group(self, gid: int) -> str:
        if gid not in self.groups:
            try:
                self.groups[gid] = grp.getgrgid(gid).gr_name
            except KeyError:
                self.groups[gid] = str(gid)
        return self.groups[gid]


def node_path(top: Path, path: Path, config: str) -> str:
    rel = path.relative_to(top).as_posix()
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(
            [f"{top}: {os.fsencode(rel)!r}: file name is not valid UTF-8 (rootfs {config})"]
        ) from None
    return "/" + rel


def rootfs_entries(site: Site, config: str, ids: _Ids) -> list[NodeFile]:
    """Everything below rootfs/<config>/ (not the directory itself), as it is on the head.

    Read with rootfs_walk: nothing outside the tree is ever read, whatever links it holds."""
    top = site.paths.rootfs / config
    origin = f"rootfs {config}"
    entries = []
    try:
        for rel, st, data in rootfs_walk(top, config):
            where = node_path(top, top / rel, config)
            mode = stat.S_IMODE(st.st_mode)
            ownership = (ids.user(st.st_uid), ids.group(st.st_gid), st.st_uid, st.st_gid)
            if stat.S_ISDIR(st.st_mode):
                entries.append(NodeFile(where, "dir", mode, *ownership, origin=origin))
            elif stat.S_ISLNK(st.st_mode):
                target = os.fsdecode(data)
                entries.append(
                    NodeFile(where, "symlink", mode, *ownership, target=target, origin=origin)
                )
            else:
                entries.append(
                    NodeFile(where, "file", mode, *ownership, content=data, origin=origin)
                )
    except OSError as e:
        message = f"{e.filename or top}: cannot read: {e.strerror} (rootfs {config})"
        raise ConfigError([message]) from e
    return entries


ROOTFS_KINDS = "not a regular file, directory or symlink"


def rootfs_walk(
    top: Path, config: str, *, content: bool = True
) -> Iterator[tuple[str, os.stat_result, bytes]]:
    """(path relative to `top`, lstat, content or link target) of every entry below `top`,
    sorted byte-wise, parents first. Every directory is opened relative to its parent's file
    descriptor with O_NOFOLLOW and every file read with O_NOFOLLOW and checked on the open file,
    so no link (not `top` itself either, nor one swapped in during the walk) is followed out of
    the tree. A fifo, socket or device is refused (reading one would hang or read the head's
    hardware). `content=False` yields b"" for files, unread."""
    try:
        st = top.lstat()
    except OSError as e:
        raise ConfigError([f"{top}: cannot read: {e.strerror} (rootfs {config})"]) from e
    if not stat.S_ISDIR(st.st_mode):
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else ROOTFS_KINDS
        raise ConfigError([f"{top}: is {what}; a Root FS tree must be a directory"])
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        yield from _walk_fd(fd, top, "", config, content)
    finally:
        os.close(fd)


def _walk_fd(
    dir_fd: int, top: Path, prefix: str, config: str, content: bool
) -> Iterator[tuple[str, os.stat_result, bytes]]:
    with os.scandir(dir_fd) as it:
        names = sorted((e.name for e in it), key=os.fsencode)
    for name in names:
        rel = prefix + name
        st = os.lstat(name, dir_fd=dir_fd)
        if stat.S_ISLNK(st.st_mode):
            yield rel, st, os.fsencode(os.readlink(name, dir_fd=dir_fd))
        elif stat.S_ISDIR(st.st_mode):
            yield rel, st, b""
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            sub = _open_same(name, dir_fd, flags, st, top / rel)
            try:
                yield from _walk_fd(sub, top, rel + "/", config, content)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode) and not content:
            yield rel, st, b""
        elif stat.S_ISREG(st.st_mode):
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = _open_same(name, dir_fd, flags, st, top / rel)
            with os.fdopen(fd, "rb") as f:
                yield rel, st, f.read()
        else:
            raise ConfigError([f"{top / rel}: {ROOTFS_KINDS} (rootfs {config})"])


def _open_same(name: str, dir_fd: int, flags: int, st: os.stat_result, path: Path) -> int:
    """Open `name` and make sure it is still the entry lstat saw (not swapped meanwhile)."""
    fd = os.open(name, flags, dir_fd=dir_fd)
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise OSError(errno.ESTALE, "changed while it was read", str(path))
    return fd


# Root FS files already warned about in this process (a tree serves many nodes).
_warned: set[Path] = set()


def warn_private_files(site: Site, host: Host) -> None:
    """One `qlimage: warning:` line on stderr per file of the host's Root FS trees that is not
    world-readable: it keeps its mode on the node, but travels inside a bundle that anyone on
    the boot network can fetch by MAC (SECURITY.md). The build goes on."""
    for config in host.options.get("rootfs", ()):
        top = site.paths.rootfs / config
        with contextlib.suppress(OSError, ConfigError):
            for rel, st, _ in rootfs_walk(top, config, content=False):
                path = top / rel
                if stat.S_ISREG(st.st_mode) and not st.st_mode & 0o004 and path not in _warned:
                    _warned.add(path)
                    print(
                        f"qlimage: warning: {path}: mode {stat.S_IMODE(st.st_mode):04o} is not "
                        "world-readable, but the file travels in node bundles that anyone on "
                        "the boot network can fetch",
                        file=sys.stderr,
                    )


def _path_key(path: str) -> list[str]:
    return path.split("/")


def layer(layers: Iterable[Iterable[NodeFile]]) -> list[NodeFile]:
    """Merge layers (later wins; a non-directory drops what an earlier layer had below it),
    then sort by path components."""
    merged: dict[str, NodeFile] = {}
    for entries in layers:
        for entry in entries:
            old = merged.get(entry.path)
            if old is not None and old.type == "dir" and entry.type != "dir":
                prefix = entry.path + "/"
                for path in [p for p in merged if p.startswith(prefix)]:
                    del merged[path]
            merged[entry.path] = entry
    return sorted(merged.values(), key=lambda e: _path_key(e.path))


def render_bundle(site: Site, host: Host) -> Bundle:
    """Everything `host` receives at boot. Raises ConfigError for options that cannot be
    rendered (e.g. an unknown flavor with a network option, two mounts on one path)."""
    r = _Renderer(site, host)
    r.identity()
    for kind in OPTION_KINDS:
        if kind in host.options or kind in DEFAULT_OPTIONS:
            getattr(r, kind)(host.options.get(kind, DEFAULT_OPTIONS.get(kind)))
    r.ssh()
    assert len({f.path for f in r.files}) == len(r.files), "two options write the same file"
    ids = _Ids()
    layers = [r.files, *(rootfs_entries(site, c, ids) for c in host.options.get("rootfs", ()))]
    bundle = Bundle(
        node=host.name,
        files=tuple(layer(layers)),
        actions=tuple(MappingProxyType(a) for a in r.actions),
    )
    check_identity(site, host, bundle)
    return bundle


def check_identity(site: Site, host: Host, bundle: Bundle) -> None:
    """The inventory names the node: a Root FS tree may not replace /etc/hostname (the
    runner's hostname action would set the inventory name anyway, so the file would lie)."""
    for f in bundle.files:
        if f.path == HOSTNAME_PATH and f.origin.startswith("rootfs "):
            config = f.origin.removeprefix("rootfs ")
            raise ConfigError(
                [
                    f"{site.paths.rootfs / config}{HOSTNAME_PATH}: host {host.name}: a Root FS"
                    f" tree may not replace {HOSTNAME_PATH} (the node's name comes from nodes.d)"
                ]
            )


# --------------------------------------------------------------------------------------------
# JSON


def text_of(content: bytes) -> str | None:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        return None


def file_json(f: NodeFile) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "path": f.path,
        "type": f.type,
        "owner": f.owner,
        "group": f.group,
        "uid": f.uid,
        "gid": f.gid,
    }
    if f.type == "symlink":
        doc["target"] = f.target
        return doc
    doc["mode"] = f"{f.mode:04o}"
    if f.type == "file":
        text = text_of(f.content)
        if text is None:
            doc.update(content=base64.b64encode(f.content).decode("ascii"), encoding="base64")
        else:
            doc.update(content=text, encoding="utf-8")
    return doc


def bundle_document(bundle: Bundle) -> dict[str, Any]:
    return {
        "format": BUNDLE_FORMAT,
        "node": bundle.node,
        "files": [file_json(f) for f in bundle.files],
        "actions": [dict(a) for a in bundle.actions],
    }


def bundle_json(bundle: Bundle) -> bytes:
    """Canonical JSON: sorted keys, no insignificant whitespace, ASCII only (non-ASCII text
    as \\u escapes), one trailing newline. The same bundle always gives the same bytes."""
    text = json.dumps(
        bundle_document(bundle), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )
    return (text + "\n").encode("ascii")


# --------------------------------------------------------------------------------------------
# Change detection for doit


@functools.cache
def _code_digest() -> str:
    """This module and its templates: a change to either may change every bundle."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(templates.digest("bundle").encode())
    return h.hexdigest()


def _rootfs_manifest(site: Site, config: str, ids: _Ids) -> str:
    """stat() data of every entry below the config, no file contents: cheap, and any edit,
    chmod, chown, rename or replacement changes it (ctime cannot be set back)."""
    top = site.paths.rootfs / config
    h = hashlib.sha256()
    if not top.is_dir():
        return "missing"
    for path in walk(top):
        st = path.lstat()
        target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
        line = (
            f"{os.fsencode(path.relative_to(top))!r}\t{st.st_mode:o}\t{st.st_uid}:{st.st_gid}\t"
            f"{ids.user(st.st_uid)}:{ids.group(st.st_gid)}\t{st.st_size}\t{st.st_mtime_ns}\t"
            f"{st.st_ctime_ns}\t{st.st_ino}\t{target!r}\n"
        )
        h.update(line.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


class BundleInputs:
    """Everything render_bundle reads for a host, for the hosts of one build: it changes
    whenever the bundle could change (the host's identity and options, the networks it has
    addresses on, its image's flavor, its chroot, the rootfs trees it uses by stat data, this
    module and its templates), and not when another host or network changes.

    The site-wide parts are read once per build and each rootfs config is walked once, however
    many hosts use it: the bundle task asks this for every host of a 10,000-node site."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.ids = _Ids()
        self.rootfs: dict[str, str] = {}
        self.common = (
            ("code", _code_digest()),
            ("format", BUNDLE_FORMAT),
            ("head", site.head_address),  # the default time server
            ("authorized_keys_header", sshfiles.authorized_header(site)),  # small, per site
        )
        # Hashed once; each host's key continues from a copy.
        self.hashed_common = hashlib.blake2b(repr(self.common).encode(), digest_size=16)
        self.networks = {name: (str(n.cidr), n.gateway, n.mtu) for name, n in site.networks.items()}
        self.images = {
            name: (b.image, site.images[b.image].flavor) for name, b in site.bootconfigs.items()
        }
        self.chroots = {
            c.name: contract.chroot_line(c.name, c.source) for c in site.chroots.values()
        }
        self.stems: dict[tuple[Any, ...], Any] = {}  # hashes by surroundings, see key

    def rootfs_digest(self, config: str) -> str:
        if config not in self.rootfs:
            self.rootfs[config] = _rootfs_manifest(self.site, config, self.ids)
        return self.rootfs[config]

    # What `parts` holds, in its order: the host's own, then what the site says of it.
    PARTS = (
        "name",
        "mac",
        "source",
        "addresses",
        "bootconfig",
        "options",
        "option_sources",
        "image",
        "networks",
        "rootfs",
        "chroot",
    )

    def parts(self, host: Host) -> tuple[Any, ...]:
        """The host's own parts (the site-wide ones are `common`), named by PARTS."""
        options = host.options
        return (
            host.name,
            host.mac,
            host.source,
            tuple((a.network, a.address) for a in host.addresses),
            host.bootconfig,
            _canonical(options) if options else {},
            _canonical(host.option_sources) if host.option_sources else {},
            *self.site_parts(host),
        )

    def site_parts(self, host: Host) -> tuple[Any, ...]:
        """The parts of `parts` that the site's other files give the host (its image's flavor,
        its networks, its rootfs trees, its chroot): a function of `surroundings`."""
        chroot = self.site.host_chroot(host)
        return (
            self.images[host.bootconfig],
            tuple((a.network, *self.networks[a.network]) for a in host.addresses),
            tuple((c, self.rootfs_digest(c)) for c in host.options.get("rootfs", ())),
            self.chroots[chroot.name] if chroot else "",
        )

    @staticmethod
    def surroundings(host: Host) -> tuple[Any, ...]:
        """What of the host site_parts reads: hosts alike in it get the same site_parts."""
        addresses = host.addresses
        # The one network of most hosts as itself, a string, which no tuple of them equals.
        networks: Any = (
            addresses[0].network if len(addresses) == 1 else tuple([a.network for a in addresses])
        )
        options = host.options
        if not options:
            return host.bootconfig, networks
        return host.bootconfig, networks, tuple(options.get("rootfs", ())), options.get("chroot")

    def key(self, host: Host) -> str:
        """The parts as one short digest. For a host as the site loaded it, its origin stands
        for all of its own parts (equal origins, equal hosts: site/load.py), so the key is the
        origin and the site parts, which hosts alike share: a third of the cost, paid for
        each host of a 10,000-node site on every build. Else the parts themselves: repr is
        exact for the plain data they hold (strings, numbers, tuples, the host's option
        mappings) and a tenth of the cost of JSON."""
        origin = self.site.origin(host)
        if not origin:
            h = self.hashed_common.copy()
            h.update(repr(self.parts(host)).encode("utf-8", "surrogateescape"))
            return h.hexdigest()
        around = self.surroundings(host)
        stem = self.stems.get(around)
        if stem is None:
            stem = self.stems[around] = self.stem(host)
        h = stem.copy()
        h.update(origin.encode())
        return h.hexdigest()

    def stem(self, host: Host) -> Any:
        """The common parts and the host's site parts hashed, where every key of a host with
        the same surroundings starts. Marked as a stem, so that no key of an origin is the key
        of a host's parts."""
        h = self.hashed_common.copy()
        h.update(repr(("stem", self.site_parts(host))).encode("utf-8", "surrogateescape"))
        return h


def _canonical(value: Any) -> Any:
    """Mappings with their keys in sorted order: a host's options come in file order from a
    fresh parse and sorted from the validation cache, and mean the same."""
    if isinstance(value, Mapping):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def bundle_inputs(site: Site, host: Host) -> str:
    """BundleInputs of one host as JSON, to read (`key` is what the build compares)."""
    inputs = BundleInputs(site)
    doc = {**dict(inputs.common), "host": dict(zip(inputs.PARTS, inputs.parts(host), strict=True))}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# Preview and diff


def _mode(f: NodeFile) -> str:
    return "link" if f.type == "symlink" else f"{f.mode:04o}"


def _label(f: NodeFile) -> str:
    path = f.path + ("/" if f.type == "dir" else "")
    if f.type == "symlink":
        path += f" -> {f.target}"
    return f"{_mode(f)} {f.owner}:{f.group} {path}"


def _action_line(action: Mapping[str, Any]) -> str:
    words = [str(action["kind"])]
    for key in sorted(k for k in action if k != "kind"):
        value = action[key]
        if isinstance(value, list | tuple):
            words.append(f"{key}=[{shlex.join(str(v) for v in value)}]")
        else:
            words.append(f"{key}={shlex.quote(str(value))}")
    return " ".join(words)


def describe(bundle: Bundle) -> str:
    """What `qlimage preview` shows: one line per entry ("mode owner:group path  (origin)";
    directories end in "/", symlinks show their target), then the content of each file
    (text as is, else "<N bytes binary>"), then the actions in order."""
    out = [f"node {bundle.node}: {len(bundle.files)} files, {len(bundle.actions)} actions", ""]
    out += [f"{_label(f)}  ({f.origin})" for f in bundle.files]
    for f in bundle.files:
        if f.type != "file":
            continue
        out += ["", f"==> {f.path} <=="]
        text = text_of(f.content)
        if text is None or "\0" in text:
            out.append(f"<{len(f.content)} bytes binary>")
        elif text:
            out += text.splitlines()
            if not text.endswith("\n"):
                out.append("\\ No newline at end of file")
    out += ["", "actions:"]
    out += [f"  {_action_line(a)}" for a in bundle.actions] or ["  (none)"]
    return "\n".join(out) + "\n"


def parse_bundle_json(data: bytes) -> Bundle:
    """A bundle back from its JSON (origins are not in the JSON and come back empty)."""
    try:
        doc = json.loads(data)
        if doc.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"format {doc.get('format')!r} is not {BUNDLE_FORMAT}")
        files = []
        for item in doc["files"]:
            content = b""
            if item["type"] == "file":
                raw = item["content"]
                if item.get("encoding", "utf-8") == "base64":
                    content = base64.b64decode(raw, validate=True)
                else:
                    content = raw.encode("utf-8")
            files.append(
                NodeFile(
                    item["path"],
                    item["type"],
                    int(item["mode"], 8) if "mode" in item else 0o777,
                    item.get("owner", str(item["uid"])),
                    item.get("group", str(item["gid"])),
                    item["uid"],
                    item["gid"],
                    content=content,
                    target=item.get("target", ""),
                )
            )
        actions = tuple(MappingProxyType(a) for a in doc.get("actions", []))
        return Bundle(doc["node"], tuple(files), actions)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise QlimageError(f"not a bundle (format {BUNDLE_FORMAT}): {e!r}") from e


def _content_diff(old: NodeFile | None, new: NodeFile | None) -> list[str]:
    a = old.content if old is not None and old.type == "file" else None
    b = new.content if new is not None and new.type == "file" else None
    if a == b or (a is None and b is None):
        return []
    path = (new or old).path  # type: ignore[union-attr]
    ta, tb = text_of(a or b""), text_of(b or b"")
    if ta is None or tb is None or "\0" in ta + tb:
        return [f"  binary content differs ({len(a or b'')} -> {len(b or b'')} bytes)"]
    lines = difflib.unified_diff(
        ta.splitlines(),
        tb.splitlines(),
        "a" + path if a is not None else "/dev/null",
        "b" + path if b is not None else "/dev/null",
        lineterm="",
    )
    return list(lines)


def _changes(old: NodeFile, new: NodeFile) -> list[str]:
    changes = []
    if old.type != new.type:
        changes.append(f"type {old.type} -> {new.type}")
    if old.type != "symlink" and new.type != "symlink" and old.mode != new.mode:
        changes.append(f"mode {old.mode:04o} -> {new.mode:04o}")
    if (old.owner, old.group) != (new.owner, new.group):
        changes.append(f"owner {old.owner}:{old.group} -> {new.owner}:{new.group}")
    if (old.uid, old.gid) != (new.uid, new.gid):
        changes.append(f"ids {old.uid}:{old.gid} -> {new.uid}:{new.gid}")
    if old.target != new.target:
        changes.append(f"target {old.target or '-'} -> {new.target or '-'}")
    if old.type == new.type == "file" and old.content != new.content:
        changes.append("content")
    return changes


def diff_file(previous: str, new: Bundle) -> str:
    """The diff from a previous bundle.json file to `new` (empty when nothing changed)."""
    try:
        old = Path(previous).read_bytes()
    except OSError as e:
        raise QlimageError(f"{previous}: cannot read the previous bundle: {e.strerror}") from e
    return diff(old, new)


def diff(old_json: bytes, new: Bundle) -> str:
    """How `new` differs from a bundle published before (its JSON): added, removed and
    changed entries with a unified diff of text contents, then the actions. "" if equal."""
    old = parse_bundle_json(old_json)
    before = {f.path: f for f in old.files}
    after = {f.path: f for f in new.files}
    out: list[str] = []
    if old.node != new.node:
        out.append(f"node {old.node} -> {new.node}")
    for path in sorted(before.keys() | after.keys(), key=_path_key):
        a, b = before.get(path), after.get(path)
        if a is None and b is not None:
            out.append(f"added {_label(b)}  ({b.origin})")
            out += _content_diff(None, b)
        elif b is None and a is not None:
            out.append(f"removed {_label(a)}")
            out += _content_diff(a, None)
        elif a is not None and b is not None and (changes := _changes(a, b)):
            out.append(f"changed {path}: {'; '.join(changes)}  ({b.origin})")
            out += _content_diff(a, b)
    old_actions = [_action_line(x) for x in old.actions]
    new_actions = [_action_line(x) for x in new.actions]
    if old_actions != new_actions:
        out.append("actions:")
        out += difflib.unified_diff(old_actions, new_actions, "a/actions", "b/actions", lineterm="")
    return "".join(line + "\n" for line in out)
