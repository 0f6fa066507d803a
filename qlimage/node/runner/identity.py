"""The node's identity: the kernel command line and the initrd's DHCP lease (net.env)."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
from dataclasses import dataclass

from . import names, paths
from .report import read_text


def parse_cmdline(text: str) -> dict[str, str]:
    """Kernel parameters as a dict; a bare flag such as `debug` maps to ""."""
    try:
        tokens = shlex.split(text)  # the kernel accepts double-quoted values
    except ValueError:
        tokens = text.split()
    params: dict[str, str] = {}
    for token in tokens:
        key, _, value = token.partition("=")
        params[key] = value
    return params


def parse_net_env(text: str) -> dict[str, str]:
    """Shell-style KEY=value lines as written by the initrd's udhcpc hook."""
    env: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        # DNS='10.0.2.3 10.0.2.4'; on an unbalanced quote keep the raw value.
        with contextlib.suppress(ValueError):
            value = " ".join(shlex.split(value))
        env[key.strip()] = value
    return env


_OCTET = re.compile(r"^[0-9a-f]{2}$")


def mac_from_bootif(value: str) -> str | None:
    """`01-52-54-00-12-34-56` (pxelinux: ARP hardware type, then the MAC) -> `52:54:00:...`."""
    parts = value.strip().lower().replace(":", "-").split("-")
    if len(parts) == 7:
        parts = parts[1:]
    if len(parts) != 6 or not all(_OCTET.match(p) for p in parts):
        return None
    return ":".join(parts)


def mac_from_nic(nic: str) -> str | None:
    """Fallback when the boot loader passed no BOOTIF: the MAC of the NIC the initrd used."""
    if not nic or "/" in nic:
        return None
    try:
        with open(os.path.join(paths.SYS_NET_DIR, nic, "address"), encoding="ascii") as f:
            return mac_from_bootif(f.read())
    except OSError:
        return None


@dataclass(frozen=True)
class NodeIdentity:
    base: str | None
    mac: str | None
    debug: bool
    net: dict[str, str]


def read_identity(args: argparse.Namespace) -> NodeIdentity:
    cmdline = parse_cmdline(read_text(args.cmdline) or "")
    net = parse_net_env(read_text(args.net_env) or "")
    mac = (
        mac_from_bootif(cmdline[names.CMDLINE_BOOTIF]) if names.CMDLINE_BOOTIF in cmdline else None
    )
    if mac is None:
        mac = mac_from_nic(net.get("NIC", ""))
    return NodeIdentity(
        base=cmdline.get(names.CMDLINE_HTTP) or None,
        mac=mac,
        debug=args.debug or names.CMDLINE_DEBUG in cmdline,
        net=net,
    )
