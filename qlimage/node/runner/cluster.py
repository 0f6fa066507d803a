"""The cluster-wide public files (ssh_known_hosts, shosts.equiv): one copy on the head for all
nodes, installed after the bundle.

They name every host, so a copy in each bundle would make the bundles quadratic in the number
of nodes. The runner fetches <qlustar.http>/cluster/SHA256SUMS, then each file it lists whose
name is in the runner's own table (names.CLUSTER_FILES), verifies every digest, and only then
writes them, 0644 root:root, at the table's node paths. A name the table does not have, such
as one with `/` or `..`, is never fetched nor used as a path: SHA256SUMS cannot choose where
anything is written.
"""

from __future__ import annotations

import hashlib
import re
import urllib.error

from . import names
from .apply import apply_files
from .bundle import BundleError, Entry, check_node_paths
from .fetch import Fetcher, FetchError, with_retries
from .report import Reporter

SUM_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")  # sha256sum: text or binary mode


def cluster_url(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{names.CLUSTER_DIR}/{name}"


def wanted_digests(listing: bytes, reporter: Reporter) -> dict[str, str]:
    """{name: hex digest} of the names of our table that SHA256SUMS lists; other lines are
    ignored (a newer head may serve more files than this runner knows)."""
    table = dict(names.CLUSTER_FILES)
    wanted: dict[str, str] = {}
    for line in listing.decode("utf-8", errors="replace").splitlines():
        match = SUM_LINE.fullmatch(line.rstrip("\r"))
        name = match.group(2) if match else None
        if match is None or name not in table:
            reporter.detail(f"cluster files: ignored {names.CLUSTER_SUMS} line {line[:80]!r}")
            continue
        digest = match.group(1).lower()
        if wanted.setdefault(name, digest) != digest:
            raise FetchError(f"{names.CLUSTER_SUMS} lists {name} twice with other digests")
    return wanted


def fetch_verified(base: str, fetch: Fetcher, reporter: Reporter) -> dict[str, bytes] | None:
    """One attempt: SHA256SUMS and the files it lists that we install, every digest checked.
    None when the head serves no SHA256SUMS (404: a head without cluster files)."""
    sums_url = cluster_url(base, names.CLUSTER_SUMS)
    try:
        listing = fetch(sums_url)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise
    files = {}
    for name, expected in wanted_digests(listing, reporter).items():
        url = cluster_url(base, name)
        data = fetch(url)
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise FetchError(f"checksum mismatch for {url}: got {actual}, expected {expected}")
        files[name] = data
    return files


def entries(files: dict[str, bytes]) -> list[Entry]:
    """What to write, in the table's order: public data, so 0644 root:root."""
    return [
        Entry(path, "file", 0, 0, "root", "root", names.CLUSTER_FILE_MODE, files[name])
        for name, path in names.CLUSTER_FILES
        if name in files
    ]


def install_cluster_files(base: str, fetch: Fetcher, reporter: Reporter) -> bool:
    """Fetch, verify and install the cluster files; False (after one console line) when they
    could not be installed. Nothing is written unless every listed file verified."""
    try:
        # A mismatch is retried: the head may be rewriting the files between our requests.
        files = with_retries(
            cluster_url(base, ""), lambda: fetch_verified(base, fetch, reporter), reporter
        )
    except FetchError as e:
        reporter.step(f"cluster files: {e}; none installed")
        return False
    if files is None:
        reporter.step(f"cluster files: the head serves no {names.CLUSTER_SUMS}; skipped")
        return True
    todo = entries(files)
    try:
        check_node_paths(todo)
        apply_files(todo, reporter)
    except (BundleError, OSError) as e:
        reporter.step(f"cluster files: cannot install: {e}")
        return False
    installed = ", ".join(e.path for e in todo) or f"none that {names.CLUSTER_SUMS} lists"
    reporter.step(f"cluster files: installed {installed}")
    return True
