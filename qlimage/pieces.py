"""Each host's pieces of the files that name every node, kept from one build to the next.

dnsmasq.conf, nginx.conf, the multicast daemon's clients, pxelinux's HOSTID links and the
cluster's SSH files hold a piece per host: a line, a few lines, a name. At 10,000 hosts making
them costs a build 0.05 s, for a one-node edit that changes one piece of each. So a piece is
kept by the host's origin (Site.origin: what the loader made the host of; two loaded hosts of
one origin are equal in every field) within a section per kind of piece, whose key names all
else the piece is made of: the `context` its maker is given (the site's values it reads) and
the code of qlimage (any change to a file of the package drops every section). A maker sees
the hosts and the context only, so nothing it reads is left out of the key. A host without an
origin (its nodes.d file was read whole) gets its pieces made in every build.

A kind's pieces are columns (a piece is a tuple of strings: its first strings, its second
strings...) in the order of the section's origins, which is the order the maker was given
the hosts in: when no host changed, the kept columns are the answer as they are.

The pieces are kept in Layout.host_pieces in marshal's format (lists of strings load in a
tenth of JSON's time): our own state below the build's directory, as trusted as the build
stamp beside it; anything unreadable or of another format is no pieces. `save` writes them
back (beside, renamed in) once a build made more than a few.
"""

from __future__ import annotations

import functools
import hashlib
import marshal
import os
import sys
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

from qlimage.atomic import write_bytes
from qlimage.layout import Layout
from qlimage.site import Host, Site

FORMAT = 2
Piece = tuple[str, ...]
Columns = list[list[str]]
# A kind's pieces: (section key, the hosts' origins, the pieces' columns in that order).
Section = tuple[str, list[str], Columns]


class Pieces:
    """The kept pieces of one loaded site (`of`), by kind."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.path = Layout(site).host_pieces
        self._kept: dict[str, Section] | None = None
        self.made_now: dict[str, Section] = {}  # this build's
        self.new = 0  # pieces made for hosts with an origin, not yet written
        self._origins: list[str] | None = None

    def kept(self) -> dict[str, Section]:
        if self._kept is None:
            self._kept = read(self.path)
        return self._kept

    def origins(self, hosts: Sequence[Host]) -> list[str]:
        if hosts is self.site.hosts:  # the usual order: worked out once per build
            if self._origins is None:
                self._origins = [self.site.origin(h) for h in hosts]
            return self._origins
        return [self.site.origin(h) for h in hosts]

    def made(
        self,
        kind: str,
        context: Hashable,
        width: int,
        make: Callable[[list[Host]], Sequence[Piece]],
        hosts: Sequence[Host] | None = None,
    ) -> Columns:
        """The `width` columns of `make(hosts)` (default: the site's hosts; a piece per host,
        in their order, `width` strings each), each piece taken from the last build's when
        the host's origin and `context` (a value whose repr names everything but the hosts
        that `make` reads) are the same: `make` is given the other hosts only, all at once
        (it may check a column of values in one go)."""
        hosts = self.site.hosts if hosts is None else hosts
        origins = self.origins(hosts)
        key = section_key(kind, context)
        section = self.kept().get(kind)
        if (
            section is not None
            and section[0] == key
            and len(section[2]) == width
            and section[1] == origins
            and "" not in origins
        ):
            columns = section[2]  # no host changed
        else:
            fits = section is not None and section[0] == key and len(section[2]) == width
            old = section if fits else None
            columns = self.update(old, origins, width, make, hosts)
        self.made_now[kind] = (key, origins, columns)
        return columns

    def update(
        self,
        old: Section | None,
        origins: list[str],
        width: int,
        make: Callable[[list[Host]], Sequence[Piece]],
        hosts: Sequence[Host],
    ) -> Columns:
        """The columns, with the kept pieces of `old` where a host's origin has one and the
        pieces `make` makes of the other hosts."""
        at = {o: i for i, o in enumerate(old[1]) if o} if old is not None else {}
        places = [at.get(o, -1) for o in origins]
        missing = [i for i, place in enumerate(places) if place < 0]
        columns: Columns = (
            [[column[p] for p in places] for column in old[2]]
            if old is not None
            else [[""] * len(hosts) for _ in range(width)]
        )
        if missing:
            for i, piece in zip(missing, make([hosts[i] for i in missing]), strict=True):
                for column, text in zip(columns, piece, strict=True):
                    column[i] = text
            self.new += sum(1 for i in missing if origins[i])  # without one: made every time
        return columns

    def save(self) -> None:
        """Keep this build's pieces for the next, once it made more than a few: writing them
        costs more than making those few again in the next build (a one-node edit's build
        writes nothing). Never the first thing written for a site (a check of a site that
        was not built yet leaves no trace); a failure only costs the next build some time."""
        if self.new <= few(len(self.site.hosts)) or not self.path.parent.is_dir():
            return
        sections = {**self.kept(), **self.made_now}
        try:
            write_bytes(self.path, marshal.dumps((FORMAT, sections)), 0o600)
        except OSError:
            return
        self._kept, self.new = sections, 0


def few(hosts: int) -> int:
    """How many new pieces a build may leave unwritten: 1 % of the hosts, at most 64."""
    return min(hosts // 100, 64)


def read(path: Path) -> dict[str, Section]:
    try:
        fmt, sections = marshal.loads(path.read_bytes())
    except (OSError, EOFError, ValueError, TypeError):
        return {}
    if fmt != FORMAT or not isinstance(sections, dict):
        return {}
    return {kind: section for kind, section in sections.items() if well_formed(section)}


def well_formed(section: object) -> bool:
    """A section as `made` keeps it: columns as long as its origins (strings all; whatever
    else marshal can hold would fail the join of a file, not tell a wrong piece)."""
    if not (isinstance(section, tuple) and len(section) == 3):
        return False
    key, origins, columns = section
    return (
        isinstance(key, str)
        and isinstance(origins, list)
        and isinstance(columns, list)
        and all(isinstance(c, list) and len(c) == len(origins) for c in columns)
    )


def section_key(kind: str, context: Hashable) -> str:
    return hashlib.sha256(f"{FORMAT}\0{code_key()}\0{kind}\0{context!r}".encode()).hexdigest()


@functools.cache
def code_key() -> str:
    """The code that makes the pieces: every file of the qlimage package by its stat key
    (what the build stamp keys it by too), and the interpreter."""
    h = hashlib.sha256(sys.version.encode())
    for directory, subdirectories, files in os.walk(Path(__file__).parent):
        subdirectories[:] = sorted(d for d in subdirectories if d != "__pycache__")
        for name in sorted(files):
            st = os.stat(os.path.join(directory, name))
            h.update(
                f"{directory}/{name}\0{st.st_ino} {st.st_size} {st.st_mtime_ns} "
                f"{st.st_ctime_ns}\0".encode()
            )
    return h.hexdigest()


# The pieces of the site loaded last, with that very site object (sites are compared by
# identity: hashing one would hash its 10,000 hosts).
_current: tuple[Site, Pieces] | None = None


def of(site: Site) -> Pieces:
    """The pieces of this loaded site, one set per site object."""
    global _current
    if _current is None or _current[0] is not site:
        _current = (site, Pieces(site))
    return _current[1]
