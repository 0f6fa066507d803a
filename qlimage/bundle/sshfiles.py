"""The cluster's SSH host files: ssh_known_hosts, shosts.equiv and the authorized_keys header.

As in QluMan, ssh_known_hosts and shosts.equiv are a free header the admin edits (a site file,
absent = empty) followed by a part generated from nodes.d: every managed host under every name
it has (its inventory name, per network its hostname override and aliases, each also with the
network's domain `suffix` when the site sets one) and every address. known_hosts gets one line
per public host key (`ssh_host_keys` of the host, checked by the site loader); a host without
keys gets a comment instead of a line, because ssh has nothing to check its key against, but
it is in shosts.equiv all the same. authorized_keys is the header alone: its lines head every
node's /root/.ssh/authorized_keys, before the keys of the node's `authorized_keys` option (it
is small and the bundle carries it).

The two host files name every host, so they are served ONCE, in bootfiles/qlustar/cluster/
with a SHA256SUMS (`contract.CLUSTER_DIR`), and the node runner installs them as
/etc/ssh/ssh_known_hosts and /etc/ssh/shosts.equiv (0644 root:root: public data) after its
bundle. In the bundles they would make the build quadratic in the number of hosts, and a
one-node edit would rebuild every bundle. Private host keys never pass through here: the site
refuses them, and nodes keep or generate their own.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from qlimage import contract, templates
from qlimage.atomic import write_text
from qlimage.errors import ConfigError
from qlimage.layout import Layout
from qlimage.site import Host, Site
from qlimage.trees import read_in_root

HEADER_DIR = "ssh"  # below the site root
MAX_HEADER = 1 << 20  # a header is a few lines of hand-written text
# Text a header may hold: printable characters, tabs and line ends. A NUL or an escape sequence
# would reach every node's sshd and the admin's terminal.
HEADER_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class SshFile:
    name: str  # the file name below the served cluster/ directory and on the node

    @property
    def header(self) -> str:
        """The header's path below the site root."""
        return f"{HEADER_DIR}/{self.name}.header"

    @property
    def node_path(self) -> str:
        """Where the runner installs it: the contract's table, which the runner mirrors."""
        return dict(contract.CLUSTER_FILES)[self.name]

    def output(self, layout: Layout) -> Path:
        return layout.cluster_file(self.name)


KNOWN_HOSTS = SshFile("ssh_known_hosts")
SHOSTS_EQUIV = SshFile("shosts.equiv")
HOST_FILES = (KNOWN_HOSTS, SHOSTS_EQUIV)
# The runner installs the names of the contract's table and no other: the two must agree.
assert {f.name for f in HOST_FILES} == dict(contract.CLUSTER_FILES).keys()
AUTHORIZED_KEYS_HEADER = f"{HEADER_DIR}/authorized_keys.header"
SUMS = contract.CLUSTER_SUMS  # beside the host files: what the runner verifies them with


# --------------------------------------------------------------------------------------------
# Inputs


def read_header(site: Site, rel: str) -> str:
    """The header at `rel` below the site root, "" when there is none. Read inside the root (a
    link cannot pull in a file of the head), and checked: it is served to every node."""
    try:
        data = read_in_root(site.paths.root, rel)
    except OSError as e:  # a link loop, an unreadable directory
        raise ConfigError([f"{rel}: cannot read: {e.strerror}"]) from None
    if data is None:
        if os.path.lexists(site.paths.root / rel):
            raise ConfigError([f"{rel}: not a regular file inside the site; expected a text file"])
        return ""
    if len(data) > MAX_HEADER:
        raise ConfigError([f"{rel}: {len(data)} bytes; expected at most {MAX_HEADER}"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{rel}: not UTF-8 text (invalid byte at offset {e.start})"]) from None
    text = text.replace("\r\n", "\n")
    bad = HEADER_CONTROL.search(text)
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        raise ConfigError([f"{rel}: line {line}: a control character; expected plain text lines"])
    if "PRIVATE KEY" in text:
        # Every node fetches the header, served without a password.
        raise ConfigError([f"{rel}: holds a private key; expected public keys only"])
    return text if not text or text.endswith("\n") else text + "\n"


def with_suffix(name: str, suffix: str) -> str:
    return f"{name}.{suffix.strip('.')}" if suffix.strip(".") else name


def host_names(site: Site, host: Host) -> list[str]:
    """Every name of `host`, without repeats: the inventory name, then per network (in network
    order) its hostname and aliases, each followed by its form with the network's suffix."""
    names = [host.name]
    for a in host.addresses:
        suffix = site.networks[a.network].suffix
        for name in (a.hostname, *a.aliases):
            names += [name, with_suffix(name, suffix)]
    return list(dict.fromkeys(names))


def host_addresses(host: Host) -> list[str]:
    return list(dict.fromkeys(a.address for a in host.addresses))


# --------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class Entry:
    """One managed host as the templates see it."""

    name: str
    source: str
    names: tuple[str, ...]  # names, then addresses
    keys: tuple[str, ...]

    @property
    def patterns(self) -> str:
        """known_hosts' host field: every name and address, comma-joined."""
        return ",".join(self.names)


def entries(site: Site) -> Iterator[Entry]:
    for host in sorted(site.hosts, key=lambda h: h.name):
        names = (*host_names(site, host), *host_addresses(host))
        yield Entry(host.name, host.source, names, host.ssh_host_keys)


def render(site: Site, f: SshFile, header: str) -> str:
    """The whole file: a line saying where it comes from, the header, the generated part."""
    return templates.render(
        f"bundle/{f.name}.j2", header=header, header_path=f.header, hosts=list(entries(site))
    )


def render_all(site: Site) -> dict[SshFile, str]:
    """Both host files, each with its header."""
    return {f: render(site, f, read_header(site, f.header)) for f in HOST_FILES}


def sums(files: Mapping[str, str]) -> str:
    """SHA256SUMS of the served files ({name: text}): sha256sum's format, sorted by name, so
    the same files always give the same bytes."""
    return "".join(
        contract.checksum_line(hashlib.sha256(files[name].encode()).hexdigest(), name)
        for name in sorted(files)
    )


def authorized_header(site: Site) -> str:
    return read_header(site, AUTHORIZED_KEYS_HEADER)


def check_headers(site: Site) -> None:
    """ConfigError for a header that cannot be used, before any task exists."""
    problems = []
    for rel in (*(f.header for f in HOST_FILES), AUTHORIZED_KEYS_HEADER):
        try:
            read_header(site, rel)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)


# --------------------------------------------------------------------------------------------
# Writing (the graph's ssh tasks)


def write(text: str, target: Path) -> None:
    """Written beside and renamed in (its mtime clamped: it is served), so neither a node nor
    the head's sshd (an admin links /etc/ssh/ssh_known_hosts to it) reads half a file."""
    write_text(target, text, contract.CLUSTER_FILE_MODE)
