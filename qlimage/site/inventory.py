"""A nodes.d inventory parsed host by host, so that editing one node of a 10,000-node file
parses that node's text, not the whole megabyte (tomllib needs about 0.2 s for it).

The file is cut before every line that is exactly `[[hosts]]` (trailing blanks and a comment
allowed): a prefix, then one chunk per host. When the prefix parses alone without a `hosts`
key and every chunk parses alone to `{"hosts": [one table]}`, the whole file parses to the
prefix's tables plus `hosts` = those tables in order, because

- a piece that parses alone ends outside any string, array or inline table (its last line
  ends with its newline), so at every cut the whole-file parser is at the start of a
  statement, as it is at the start of the piece, and reads the piece's bytes the same way;
- `[[hosts]]` starts a fresh table, and a chunk whose only top-level key is `hosts` (one
  element) defines nothing outside that table: keys, dotted keys, `[hosts.x]` and
  `[[hosts.x]]` all land in the array's last element, which is the chunk's own.

Anything else (a chunk that fails alone, a second table header such as `[optionsets.x]` after
the hosts, a `hosts` key in the prefix, bytes that are not UTF-8) makes `parse` answer None and
the caller parse the file whole, so a broken file is reported with tomllib's own message about
the whole file, line numbers included. Parsed chunks are remembered by the digest of their
bytes (without the empty lines that end them, see `digest`), so only chunks whose bytes are
new are parsed.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping
from typing import Any, NamedTuple

# The array-of-tables header of `hosts` and the rest of its line (CRLF line ends allowed);
# split() keeps those that start a line. Not `^` with MULTILINE: a pattern that starts with
# its literal is searched for as a string, twice as fast over a megabyte.
HOST_HEADER = re.compile(rb"\[\[hosts\]\][ \t]*(?:#[^\r\n]*)?(?=\r?\n|\Z)")


class Inventory(NamedTuple):
    prefix: dict[str, Any]  # the tables before the first host (option sets, groups)
    prefix_digest: str  # DIGEST_RULE, then the prefix's digest
    hosts: list[dict[str, Any]]
    digests: list[str]  # of each host's chunk, in file order
    new: list[int]  # indexes of hosts whose chunk was not known: the ones to validate

    @property
    def data(self) -> dict[str, Any]:
        return assemble(self.prefix, self.hosts)


def split(blob: bytes) -> tuple[bytes, list[bytes]]:
    """The bytes before the first `[[hosts]]` line, and the chunks each such line starts."""
    starts = [
        m.start() for m in HOST_HEADER.finditer(blob) if m.start() == 0 or blob[m.start() - 1] == 10
    ]
    if not starts:
        return blob, []
    ends = [*starts[1:], len(blob)]
    return blob[: starts[0]], [blob[a:b] for a, b in zip(starts, ends, strict=True)]


# Names the rule `digest` follows; the prefix digest of every remembered file carries it. A
# file remembered under another rule is parsed again: its chunk digests, which name the hosts'
# origins (site/load.py), would change at the next edit of the file and change every origin.
DIGEST_RULE = "r2:"


def digest(chunk: bytes) -> str:
    """The chunk's digest, without the empty lines that end it: they separate it from the next
    host and change nothing it parses to, so a host appended after a blank line, or a blank
    line added between two hosts, leaves the host before as it was (its origin, site/load.py,
    names this digest). Only whole empty lines go: a chunk parses alone exactly when it does
    without them, and a stray carriage return is not a line end, so it stays and is seen."""
    end = len(chunk)
    while True:
        if chunk.endswith(b"\n\n", 0, end):
            end -= 1
        elif chunk.endswith(b"\n\r\n", 0, end):
            end -= 2
        else:
            break
    return hashlib.sha256(memoryview(chunk)[:end]).hexdigest()[:32]


def assemble(prefix: Mapping[str, Any], hosts: list[dict[str, Any]]) -> dict[str, Any]:
    """What tomllib gives for the whole file: no `hosts` key when the file has no host."""
    return {**prefix, "hosts": hosts} if hosts else dict(prefix)


def parse(blob: bytes, known: Mapping[str, Any]) -> Inventory | None:
    """The file parsed piece by piece, taking the host of each chunk whose digest `known`
    maps to its table; None when the file does not cut into pieces that parse alone."""
    head, chunks = split(blob)
    prefix = parse_piece(head)
    if prefix is None or "hosts" in prefix:
        return None
    digests = [digest(chunk) for chunk in chunks]
    hosts = [known.get(key) for key in digests]
    new = [i for i, table in enumerate(hosts) if not isinstance(table, dict)]
    # Last first: tables after the hosts, the usual reason a file does not cut, land in the
    # last chunk, and a file of 10,000 hosts is then refused before 9,999 are parsed.
    for i in reversed(new):
        hosts[i] = parse_host(chunks[i])
        if hosts[i] is None:
            return None
    prefix_digest = DIGEST_RULE + digest(head)
    return Inventory(prefix, prefix_digest, hosts, digests, new)  # type: ignore[arg-type]


def parse_piece(piece: bytes) -> dict[str, Any] | None:
    try:
        return tomllib.loads(piece.decode())
    # ValueError covers TOMLDecodeError, UnicodeDecodeError and integers too long to convert.
    except (ValueError, RecursionError):
        return None


def parse_host(chunk: bytes) -> dict[str, Any] | None:
    """The one host table a chunk defines, or None when it defines anything else."""
    data = parse_piece(chunk)
    if data is None or len(data) != 1:
        return None
    hosts = data.get("hosts")
    if not isinstance(hosts, list) or len(hosts) != 1 or not isinstance(hosts[0], dict):
        return None
    return hosts[0]


class Remembered(NamedTuple):
    key: list[Any]  # the file's content digest, schema name and schema digest
    prefix_digest: str
    prefix: dict[str, Any]
    pairs: list[list[Any]]  # [chunk digest, valid host table] in file order

    @property
    def hosts(self) -> list[dict[str, Any]]:
        # Not from by_digest: two chunks of the same bytes are two hosts (a clash to report).
        return [table for _, table in self.pairs]

    @property
    def by_digest(self) -> dict[str, dict[str, Any]]:
        return dict(self.pairs)


def remembered(entry: Any, key: list[Any]) -> Remembered | None:
    """A file's cache entry (see `entry`) if it was written under the same schema, else None:
    a cache written by hand or by another version is only a speed-up, never trusted."""
    if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], list)):
        return None
    if entry[0][1:] != key[1:] or not isinstance(entry[2], dict) or not isinstance(entry[3], list):
        return None
    if not (isinstance(entry[1], str) and entry[1].startswith(DIGEST_RULE)):
        return None
    pairs = entry[3]
    if not all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], dict)
        for p in pairs
    ):
        return None
    return Remembered(entry[0], entry[1], entry[2], pairs)


def entry(key: list[Any], parsed: Inventory) -> list[Any]:
    """What the cache keeps of a valid file: its key, its prefix, each host by chunk digest."""
    pairs = [[d, h] for d, h in zip(parsed.digests, parsed.hosts, strict=True)]
    return [key, parsed.prefix_digest, parsed.prefix, pairs]
