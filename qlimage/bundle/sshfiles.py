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
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import NamedTuple

from qlimage import contract, pieces, templates
from qlimage.atomic import write_text
from qlimage.errors import ConfigError
from qlimage.layout import Layout
from qlimage.site import Host, Site
from qlimage.tasks.stamp import MARGIN_NS
from qlimage.templates import UnsafeValue
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
    return names_of(host, suffixes(site))


def suffixes(site: Site) -> dict[str, str]:
    """{network: what with_suffix appends to a name there ("" for none)}."""
    return {name: with_suffix("", net.suffix) for name, net in site.networks.items()}


def names_of(host: Host, suffixes: Mapping[str, str]) -> list[str]:
    names = [host.name]
    for a in host.addresses:
        suffix = suffixes[a.network]
        for name in (a.hostname, *a.aliases):
            names.append(name)
            if suffix:
                names.append(name + suffix)
    return list(dict.fromkeys(names))


def host_addresses(host: Host) -> list[str]:
    return list(dict.fromkeys(a.address for a in host.addresses))


# --------------------------------------------------------------------------------------------
# Rendering


class Entry(NamedTuple):
    """One managed host as the files name it (a tuple: 10,000 of them are made per build)."""

    name: str
    source: str
    names: tuple[str, ...]  # names, then addresses
    keys: tuple[str, ...]

    @property
    def patterns(self) -> str:
        """known_hosts' host field: every name and address, comma-joined."""
        return ",".join(self.names)


def entries(site: Site) -> Iterator[Entry]:
    sfx = suffixes(site)
    for host in sorted(site.hosts, key=attrgetter("name")):
        yield entry(host, sfx)


def entry(host: Host, sfx: Mapping[str, str]) -> Entry:
    a = host.addresses
    if len(a) == 1 and a[0].hostname == host.name and not a[0].aliases and not sfx[a[0].network]:
        names: tuple[str, ...] = (host.name, a[0].address)  # most hosts: what names_of says
    else:
        names = (*names_of(host, sfx), *host_addresses(host))
    return Entry(host.name, host.source, names, host.ssh_host_keys)


def render(site: Site, f: SshFile, header: str) -> str:
    """The whole file: a line saying where it comes from, the header, the generated part."""
    return render_entries(f, header, list(entries(site)))


def render_all(site: Site) -> dict[SshFile, str]:
    """Both host files, each with its header. Each host's lines are kept between builds
    (qlimage.pieces): a host's lines are its entry's, and a file's generated part is its
    hosts' lines in the order of their names, as render_entries makes it."""
    sfx = suffixes(site)
    hosts = sorted(site.hosts, key=attrgetter("name"))
    made = pieces.of(site).made(
        "ssh",
        tuple(sorted(sfx.items())),
        len(HOST_FILES),
        lambda some: host_lines(some, sfx),
        hosts,
    )
    return {
        f: render_generated(f, read_header(site, f.header), "".join(lines))
        for f, lines in zip(HOST_FILES, made, strict=True)
    }


def host_lines(hosts: list[Host], sfx: Mapping[str, str]) -> list[tuple[str, ...]]:
    """Each host's lines in each file of HOST_FILES, in that order."""
    found = [entry(host, sfx) for host in hosts]
    return list(zip(*(generate(f, found) for f in HOST_FILES), strict=True))


def render_entries(f: SshFile, header: str, hosts: list[Entry]) -> str:
    return render_generated(f, header, "".join(generate(f, hosts)))


def generate(f: SshFile, hosts: list[Entry]) -> list[str]:
    """Each host's lines in file `f`."""
    try:
        return GENERATORS[f.name](hosts)
    except UnsafeValue as e:
        raise UnsafeValue(f"bundle/{f.name}.j2: {e}") from None  # as templates.render names it


def render_generated(f: SshFile, header: str, generated: str) -> str:
    return templates.render(
        f"bundle/{f.name}.j2", header=header, header_path=f.header, generated=generated
    )


# The generated parts are built here, not by loops in the templates: at 10,000 hosts a Jinja
# loop calling a filter per value costs ten times as much. Each value still passes the filter
# the template used (templates.word, templates.line), or, when a whole column is printable
# ASCII, a regex that passes only what that filter returns unchanged.
PLAIN_WORDS = re.compile(r"[!-~]+(?:\n[!-~]+)*")  # lines of printable ASCII but space
PLAIN_LINES = re.compile(r"[ -~]*(?:\n[ -~]*)*")  # lines of printable ASCII


def all_plain(texts: list[str], pattern: re.Pattern[str]) -> bool:
    """Whether each text is a line `pattern` passes: one regex run over the texts joined by
    newlines, once the count shows that no text holds one itself."""
    joined = "\n".join(texts)
    return not texts or (
        joined.count("\n") == len(texts) - 1 and pattern.fullmatch(joined) is not None
    )


def filters(words: list[str], lines: list[str]) -> tuple[Callable[[str], str], ...]:
    """(word, line) for these values: the identity when every value is plain, else the
    templates' filters (which refuse the value that is not, as the template did)."""
    if all_plain(words, PLAIN_WORDS) and all_plain(lines, PLAIN_LINES):
        return str, str
    return templates.word, templates.line


def known_hosts_lines(hosts: list[Entry]) -> list[str]:
    """Each host's lines: one per key under all the host's names; a comment for a host
    without keys."""
    keyed = [h for h in hosts if h.keys]
    keyless = [h for h in hosts if not h.keys]
    word, line = filters(
        [h.patterns for h in keyed],
        [k for h in keyed for k in h.keys] + [t for h in keyless for t in (h.name, h.source)],
    )
    out = []
    for h in hosts:
        if h.keys:
            patterns = word(h.patterns)
            out.append("".join([f"{patterns} {line(key)}\n" for key in h.keys]))
        else:
            out.append(
                f"# {line(h.name)}: no ssh_host_keys in {line(h.source)}, so no line:"
                " ssh cannot check its key\n"
            )
    return out


def shosts_equiv_lines(hosts: list[Entry]) -> list[str]:
    """Each host's lines: a comment naming the host, then its names and addresses, one a
    line."""
    word, line = filters([n for h in hosts for n in h.names], [h.name for h in hosts])
    return [f"# {line(h.name)}\n" + "".join([word(n) + "\n" for n in h.names]) for h in hosts]


GENERATORS: dict[str, Callable[[list[Entry]], list[str]]] = {
    KNOWN_HOSTS.name: known_hosts_lines,
    SHOSTS_EQUIV.name: shosts_equiv_lines,
}


def sums(files: Mapping[str, str]) -> str:
    """SHA256SUMS of the served files ({name: text}): sha256sum's format, sorted by name, so
    the same files always give the same bytes."""
    return "".join(
        contract.checksum_line(hashlib.sha256(files[name].encode()).hexdigest(), name)
        for name in sorted(files)
    )


def authorized_header(site: Site) -> str:
    """The authorized_keys header. Every node's bundle inputs ask for it (10,000 times a
    build), so it is read again only when the file or a directory on its way changed."""
    root = site.paths.root
    key = (str(root), AUTHORIZED_KEYS_HEADER)
    signature = header_signature(root, AUTHORIZED_KEYS_HEADER)
    if signature is not None:
        known = _READ_HEADERS.get(key)
        if known is not None and known[0] == signature:
            return known[1]
    text = read_header(site, AUTHORIZED_KEYS_HEADER)
    if signature is not None and header_signature(root, AUTHORIZED_KEYS_HEADER) == signature:
        _READ_HEADERS[key] = (signature, text)  # not changed while it was read
    return text


# {(site root, header): (its signature, its text)}; a process may load several sites, or one
# site several times (tests).
_READ_HEADERS: dict[tuple[str, str], tuple[tuple[object, ...], str]] = {}


def header_signature(root: Path, rel: str) -> tuple[object, ...] | None:
    """What identifies the header file and each directory on its way below the root: type,
    inode, size, mtime and ctime of each (None past the first missing one). None when it cannot
    tell: a symlink on the way (read_in_root decides where it leads), or a time within
    MARGIN_NS of now (the kernel's coarse clock could give a rewrite the same stamps)."""
    now = time.time_ns()
    path = str(root)
    signature: list[object] = []
    for part in rel.split("/"):
        path = f"{path}/{part}"  # os.path.join costs a third of the lstat
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            signature.append(None)
            break
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode) or max(st.st_mtime_ns, st.st_ctime_ns) >= now - MARGIN_NS:
            return None
        signature.append(
            (st.st_mode, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        )
    return tuple(signature)


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
