"""Debian archive access: read apt sources, resolve package closures, fetch verified .debs.

Pure python on purpose (requests + python-debian, no apt/apt_pkg), so that image modules can be
built from real Debian packages on any build host without touching its apt state.

Trust chain: `InRelease` is checked with `gpgv` against the Debian archive keyring; the Packages
index is checked against the SHA256 in the Release file, and every .deb against the SHA256 in the
index. When `gpgv` or the keyring is not installed, or a mirror serves only an unsigned `Release`
(a local test mirror), the signature step is skipped and only the hash chain is checked.

Cache layout under cache_dir (default ~/.cache/qlimage), all files written atomically:
    indexes/<uri>_<suite>/InRelease|Release             reused while younger than max_index_age
    indexes/<uri>_<suite>/<comp>/binary-<arch>/Packages.xz   reused while its SHA256 matches
    debs/<name>_<version>_<arch>.deb                    reused while its SHA256 matches
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import requests
import urllib3
from debian.deb822 import Deb822, Packages, Release
from debian.debian_support import Version

from qlimage.atomic import write_text
from qlimage.errors import QlimageError
from qlimage.layout import USER_CACHE
from qlimage.progress import Progress
from qlimage.run import run
from qlimage.trees import file_digest

DEFAULT_CACHE_DIR = USER_CACHE
DEFAULT_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# (connect, read) seconds: a mirror that stalls this long is treated as unreachable.
TIMEOUT = (15.0, 60.0)
CHUNK = 1 << 16
# Preferred index compression first; Debian lists the uncompressed Packages in Release but does
# not serve it, so each candidate is tried in turn.
INDEX_SUFFIXES = (".xz", ".gz", "")
# Only these fields are kept while parsing (~63k stanzas for bookworm main).
INDEX_FIELDS = [
    "Package",
    "Version",
    "Architecture",
    "Filename",
    "SHA256",
    "Size",
    "Depends",
    "Pre-Depends",
    "Provides",
    "Source",
    "Priority",
    "Essential",
]
# Among several providers of a virtual package the more basic one wins, as with apt.
PRIORITY_RANK = {"required": 0, "important": 1, "standard": 2, "optional": 3, "extra": 4}
MIRROR_HINT = "check the mirror setting (apt sources or site config) and network access"
_ONE_LINE_RE = re.compile(r"^(?P<type>deb(?:-src)?)\s+(?:\[[^\]]*\]\s+)?(?P<rest>.*)$")
_RELATION_NAME_RE = re.compile(r"\s*([^\s(\[:<]+)")


@dataclass(frozen=True)
class Source:
    """One apt source: a mirror URI, one suite and its components."""

    uri: str
    suite: str
    components: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.uri} {self.suite} ({' '.join(self.components)})"


@dataclass(frozen=True)
class BinaryPackage:
    """One binary package stanza of a Packages index, reduced to what image builds need."""

    name: str
    version: str
    architecture: str
    filename: str  # relative to uri
    sha256: str
    size: int
    depends: str
    pre_depends: str
    provides: str
    uri: str
    source: str = ""  # source package name (without version)
    suite: str = ""
    priority: str = ""
    essential: bool = False

    @property
    def url(self) -> str:
        return f"{self.uri.rstrip('/')}/{self.filename}"

    @property
    def deb_name(self) -> str:
        """The cache file name; ':' of an epoch is escaped like apt does in its archives."""
        version = self.version.replace(":", "%3a")
        return f"{self.name}_{version}_{self.architecture}.deb"


@dataclass
class _Index:
    packages: dict[str, BinaryPackage] = field(default_factory=dict)
    # virtual name -> real package names providing it, best first (see collect_providers)
    providers: dict[str, list[str]] = field(default_factory=dict)


class _NotFound(Exception):
    """Internal: the server answered 404, the caller may try another file name."""


# ---------------------------------------------------------------------------- host sources


def host_sources(apt_dir: Path = Path("/etc/apt")) -> list[Source]:
    """The Debian archive sources configured on this host, in apt's order, without duplicates.

    Non-Debian repositories (vendor repos on the build host) are dropped: images are built from
    Debian packages only. So are deb-src, disabled entries and flat repositories.
    """
    found: list[Source] = []
    for path in list_source_files(apt_dir):
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".sources":
            found.extend(parse_deb822_sources(text))
        else:
            found.extend(parse_one_line_sources(text))
    return list(dict.fromkeys(s for s in found if is_debian_uri(s.uri)))


def list_source_files(apt_dir: Path) -> list[Path]:
    """sources.list first, then sources.list.d/*.list|*.sources in name order, as apt reads them."""
    files = [apt_dir / "sources.list"] if (apt_dir / "sources.list").is_file() else []
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        files += sorted(
            p for p in parts.iterdir() if p.suffix in (".list", ".sources") and p.is_file()
        )
    return files


def parse_deb822_sources(text: str) -> Iterator[Source]:
    for para in Deb822.iter_paragraphs(text.splitlines(), use_apt_pkg=False):
        if para.get("Enabled", "yes").strip().lower() in ("no", "false", "0"):
            continue
        if "deb" not in para.get("Types", "").split():
            continue
        components = tuple(para.get("Components", "").split())
        if not components:
            continue  # flat repository: no dists/ tree, not supported
        for uri in para.get("URIs", "").split():
            for suite in para.get("Suites", "").split():
                yield Source(uri.rstrip("/"), suite, components)


def parse_one_line_sources(text: str) -> Iterator[Source]:
    for raw in text.splitlines():
        match = _ONE_LINE_RE.match(raw.split("#", 1)[0].strip())
        if match is None or match["type"] != "deb":
            continue
        words = match["rest"].split()
        if len(words) >= 3:  # fewer: a flat repository, not supported
            yield Source(words[0].rstrip("/"), words[1], tuple(words[2:]))


def is_debian_uri(uri: str) -> bool:
    """A Debian archive over http(s): deb.debian.org/debian, .../debian-security, snapshot..."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return False  # we fetch with requests; file:, cdrom:, mirror+ are not handled
    return "debian" in parsed.netloc.lower() or "debian" in parsed.path.lower()


# ---------------------------------------------------------------------------- the archive


class Archive:
    """Package indexes of some sources for one architecture, with a download cache."""

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        arch: str = "amd64",
        cache_dir: Path | None = None,
        max_index_age: float = 86400.0,
        session: requests.Session | None = None,
        keyring: Path | None = DEFAULT_KEYRING,
    ) -> None:
        if not sources:
            raise QlimageError("no Debian archive sources configured", hint=MIRROR_HINT)
        self.sources = tuple(sources)
        self.arch = arch
        self.cache_dir = (cache_dir or DEFAULT_CACHE_DIR).expanduser()
        self.max_index_age = max_index_age
        self.keyring = keyring
        self._session = session or requests.Session()
        self._index: _Index | None = None

    # -- public API

    def package(self, name: str) -> BinaryPackage:
        """The newest version of `name` over all sources."""
        index = self._load()
        pkg = index.packages.get(name)
        if pkg is None:
            providers = index.providers.get(name)
            hint = (
                f"{name} is virtual, provided by {', '.join(providers)}; name one of those"
                if providers
                else "check the spelling, or add the suite/component that has it"
            )
            raise QlimageError(f"package {name!r} not found in {self._describe_sources()}", hint)
        return pkg

    def closure(self, names: Iterable[str], exclude: Iterable[str] = ()) -> list[BinaryPackage]:
        """`names` plus everything they Depend/Pre-Depend on, sorted by name.

        Excluded packages (e.g. already in a lower image layer) are neither returned nor
        followed, and satisfy any dependency naming them or something they provide.
        """
        excluded = frozenset(exclude)
        # Sorted, breadth-first: the same request always resolves the same way.
        pending = deque(sorted(set(names) - excluded))
        present = set(pending)  # everything selected or queued
        chosen: list[BinaryPackage] = []
        while pending:
            pkg = self.package(pending.popleft())
            chosen.append(pkg)
            for group in dependency_groups(pkg):
                target = self._satisfy(group, pkg, present, excluded)
                if target is not None:
                    present.add(target)
                    pending.append(target)
        return sorted(chosen, key=lambda p: p.name)

    def download_all(self, pkgs: Sequence[BinaryPackage]) -> list[Path]:
        """The verified .debs of `pkgs`, downloading the missing ones with one progress line
        (bytes and packages)."""
        missing = [p for p in pkgs if not (self.cache_dir / "debs" / p.deb_name).exists()]
        place = {p.deb_name: i for i, p in enumerate(missing, 1)}  # a closure has hundreds
        shown = Progress("download", sum(p.size for p in missing), as_bytes=True)
        paths = []
        for pkg in pkgs:
            if pkg.deb_name in place:
                shown.extra = f"package {place[pkg.deb_name]} of {len(missing)}"
            paths.append(self.download(pkg, shown if pkg.deb_name in place else None))
        shown.finish()
        return paths

    def download(self, pkg: BinaryPackage, shown: Progress | None = None) -> Path:
        """The verified .deb of `pkg` in the cache, downloading it if needed (its bytes are
        shown on `shown`, else on a progress line of its own)."""
        dest = self.cache_dir / "debs" / pkg.deb_name
        if dest.exists():
            if file_digest(dest) == pkg.sha256:
                return dest
            # A stale or damaged copy must not survive a failed re-download.
            dest.unlink()
        own = shown is None
        shown = shown or Progress(f"download {pkg.deb_name}", pkg.size, as_bytes=True)
        try:
            self._fetch(pkg.url, dest, sha256=pkg.sha256, shown=shown)
            if own:
                shown.finish()
        except _NotFound:
            raise QlimageError(
                f"{pkg.url}: not found on the mirror (HTTP 404)",
                hint="the package index may be outdated; retry with a lower max index age",
            ) from None
        return dest

    # -- dependency resolution

    def _satisfy(
        self,
        group: list[str],
        parent: BinaryPackage,
        present: set[str],
        excluded: frozenset[str],
    ) -> str | None:
        """The package to add for one alternative group, or None when it is already satisfied."""
        index = self._load()
        candidates = [(alt, index.providers.get(alt, [])) for alt in group]
        # Something already selected or excluded satisfies the group: pulling the first
        # alternative too would e.g. drag exim4 in beside an explicitly chosen postfix.
        for alt, providers in candidates:
            satisfiers = {alt, *providers}
            if not satisfiers.isdisjoint(present) or not satisfiers.isdisjoint(excluded):
                return None
        for alt, _ in candidates:
            if alt in index.packages:
                return alt
        for _, providers in candidates:
            if providers:
                return providers[0]
        raise QlimageError(
            f"{parent.name} {parent.version}: dependency '{' | '.join(group)}' "
            f"cannot be satisfied from {self._describe_sources()}",
            hint="add the suite/component that has it, or exclude it",
        )

    # -- indexes

    def _load(self) -> _Index:
        """Parse all indexes once per instance (a few seconds for a full Debian suite)."""
        if self._index is None:
            index = _Index()
            for source in self.sources:
                for pkg in self._source_packages(source):
                    current = index.packages.get(pkg.name)
                    # Ties keep the earlier source, so the order of sources is respected.
                    if current is None or Version(pkg.version) > Version(current.version):
                        index.packages[pkg.name] = pkg
            index.providers = collect_providers(index.packages.values())
            self._index = index
        return self._index

    def _source_packages(self, source: Source) -> Iterator[BinaryPackage]:
        release = self._release_file(source)
        entries = release_sha256(release)
        for component in source.components:
            path = self._packages_file(source, component, entries)
            yield from read_packages(path, source)

    def _index_dir(self, source: Source) -> Path:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{source.uri}_{source.suite}").strip("_")
        return self.cache_dir / "indexes" / name

    def _dists_url(self, source: Source) -> str:
        return f"{source.uri.rstrip('/')}/dists/{source.suite}"

    def _is_fresh(self, path: Path) -> bool:
        try:
            return time.time() - path.stat().st_mtime < self.max_index_age
        except FileNotFoundError:
            return False

    def _release_file(self, source: Source) -> Path:
        """The cached InRelease (signature checked) or, failing that, the plain Release."""
        directory = self._index_dir(source)
        inrelease, release = directory / "InRelease", directory / "Release"
        for cached in (inrelease, release):
            if self._is_fresh(cached):
                return cached
        base = self._dists_url(source)
        try:
            url = f"{base}/InRelease"
            self._fetch(url, inrelease, check=lambda p: self._verify_signature(p, url))
            release.unlink(missing_ok=True)
            return inrelease
        except _NotFound:
            pass
        try:
            self._fetch(f"{base}/Release", release)
        except _NotFound:
            raise QlimageError(
                f"{base}: neither InRelease nor Release found",
                hint=f"is {source.suite!r} a suite of {source.uri}? {MIRROR_HINT}",
            ) from None
        inrelease.unlink(missing_ok=True)
        return release

    def _verify_signature(self, path: Path, url: str) -> None:
        if self.keyring is None or not self.keyring.is_file() or shutil.which("gpgv") is None:
            return  # cannot verify without gpgv and the keyring; the hash chain still holds
        try:
            run(["gpgv", "--keyring", self.keyring, path], capture=True)
        except QlimageError as exc:
            raise QlimageError(
                f"{url}: signature does not verify against {self.keyring}",
                hint=f"the mirror may be compromised or the keyring outdated; {MIRROR_HINT}",
            ) from exc

    def _packages_file(self, source: Source, component: str, entries: dict[str, str]) -> Path:
        stem = f"{component}/binary-{self.arch}/Packages"
        names = [stem + suffix for suffix in INDEX_SUFFIXES if stem + suffix in entries]
        base = self._dists_url(source)
        if not names:
            raise QlimageError(
                f"{base}: the Release file lists no {stem} index",
                hint=f"check the components and architecture of {source}",
            )
        directory = self._index_dir(source)
        # Any verified cached copy will do, before asking a mirror that may 404 on some names.
        for name in names:
            cached = directory / name
            if cached.exists() and file_digest(cached) == entries[name]:
                return cached
        for name in names:
            dest = directory / name
            try:
                self._fetch(f"{base}/{name}", dest, sha256=entries[name])
                return dest
            except _NotFound:
                continue
        raise QlimageError(f"{base}: none of {', '.join(names)} is on the mirror", MIRROR_HINT)

    # -- transfers

    def _fetch(
        self,
        url: str,
        dest: Path,
        *,
        sha256: str | None = None,
        check: Callable[[Path], None] | None = None,
        shown: Progress | None = None,
    ) -> None:
        """Download `url` to `dest` atomically: a temp file beside it is renamed in if verified."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                digest = self._stream(url, out, shown)
            if sha256 is not None and digest != sha256:
                raise QlimageError(
                    f"{url}: SHA256 mismatch, expected {sha256}, got {digest}",
                    hint=f"the mirror may be syncing, retry later; {MIRROR_HINT}",
                )
            if check is not None:
                check(tmp)
            tmp.chmod(0o644)  # mkstemp makes 0600; the cache is not secret
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def _stream(self, url: str, out: IO[bytes], shown: Progress | None = None) -> str:
        """Copy the body of `url` into `out`, returning its SHA256."""
        digest = hashlib.sha256()
        try:
            with self._session.get(url, stream=True, timeout=TIMEOUT) as resp:
                if resp.status_code == 404:
                    raise _NotFound(url)
                resp.raise_for_status()
                # Raw bytes: a server adding Content-Encoding must not change what we hash.
                for chunk in resp.raw.stream(CHUNK, decode_content=False):
                    digest.update(chunk)
                    out.write(chunk)
                    if shown is not None:
                        shown.advance(len(chunk), shown.extra)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            reason = " ".join(str(exc).split())
            raise QlimageError(f"cannot fetch {url}: {reason}", hint=MIRROR_HINT) from exc
        return digest.hexdigest()

    def _describe_sources(self) -> str:
        return "; ".join(str(s) for s in self.sources)


# ---------------------------------------------------------------------------- parsing helpers


def release_sha256(path: Path) -> dict[str, str]:
    """File name -> SHA256 from a Release/InRelease (python-debian strips the PGP armour)."""
    release = Release(path.read_bytes())
    return {entry["name"]: entry["sha256"] for entry in release.get("SHA256", [])}


def open_index(path: Path) -> io.BufferedIOBase:
    if path.suffix == ".xz":
        return lzma.open(path, "rb")
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def read_packages(path: Path, source: Source) -> list[BinaryPackage]:
    """The index's packages, from its parsed copy beside it while the index is the file it was
    parsed from: python-debian takes 7-8 s for a Debian main index, its JSON copy 0.5 s, and
    a build whose kernel, loaders or recipes are due reads the index once per process."""
    parsed = path.with_name(path.name + PARSED_SUFFIX)
    stamp = index_stamp(path)
    key = [PACKAGE_FIELDS, stamp, source.uri, source.suite]
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        doc = json.loads(parsed.read_bytes())
        if doc["key"] == key:
            return [BinaryPackage(*values) for values in doc["packages"]]
    with open_index(path) as fh:
        packages = [
            to_binary_package(para, source)
            for para in Packages.iter_paragraphs(fh, fields=INDEX_FIELDS, use_apt_pkg=False)
        ]
    if index_stamp(path) == stamp:  # not replaced while it was read
        rows = [[getattr(p, name) for name in PACKAGE_FIELDS] for p in packages]
        with contextlib.suppress(OSError):  # only a speed-up
            write_text(parsed, json.dumps({"key": key, "packages": rows}, separators=(",", ":")))
    return packages


# A parsed index: `<index file>.parsed.json`, its rows in BinaryPackage's field order.
PARSED_SUFFIX = ".parsed.json"
PACKAGE_FIELDS = [f.name for f in fields(BinaryPackage)]


def index_stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def to_binary_package(para: Packages, source: Source) -> BinaryPackage:
    name = para["Package"]
    return BinaryPackage(
        name=name,
        version=para["Version"],
        architecture=para.get("Architecture", ""),
        filename=para["Filename"],
        sha256=para["SHA256"],
        size=int(para.get("Size", "0")),
        depends=para.get("Depends", ""),
        pre_depends=para.get("Pre-Depends", ""),
        provides=para.get("Provides", ""),
        uri=source.uri,
        source=para.get("Source", name).split()[0],
        suite=source.suite,
        priority=para.get("Priority", ""),
        essential=para.get("Essential", "no").strip().lower() == "yes",
    )


def relation_names(field_text: str) -> list[list[str]]:
    """'a (>= 1) | b:any, c' -> [['a', 'b'], ['c']]: versions and arch qualifiers dropped."""
    groups = []
    for clause in field_text.split(","):
        names = []
        for alternative in clause.split("|"):
            match = _RELATION_NAME_RE.match(alternative)
            if match:
                names.append(match[1])
        if names:
            groups.append(names)
    return groups


def dependency_groups(pkg: BinaryPackage) -> list[list[str]]:
    """Pre-Depends first (they must be unpacked first), then Depends."""
    return relation_names(pkg.pre_depends) + relation_names(pkg.depends)


def collect_providers(packages: Iterable[BinaryPackage]) -> dict[str, list[str]]:
    """Virtual name -> providers, best first: higher Priority (mawk before gawk for awk), name."""
    providers: dict[str, list[BinaryPackage]] = {}
    for pkg in packages:
        for group in relation_names(pkg.provides):
            for virtual in group:
                providers.setdefault(virtual, []).append(pkg)
    return {
        virtual: [p.name for p in sorted(pkgs, key=provider_rank)]
        for virtual, pkgs in providers.items()
    }


def provider_rank(pkg: BinaryPackage) -> tuple[int, str]:
    return PRIORITY_RANK.get(pkg.priority, len(PRIORITY_RANK)), pkg.name
