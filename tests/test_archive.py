"""Tests for qlimage.archive against a tiny real apt repository served over local HTTP."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import lzma
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from debian.debfile import DebFile

from qlimage.errors import QlimageError
from qlimage.pool import archive as archive_mod
from qlimage.pool.archive import (
    Archive,
    BinaryPackage,
    Source,
    host_sources,
    relation_names,
)

# suite -> control stanzas; every stanza becomes a real .deb built with dpkg-deb (essential on
# Debian, installed by scripts/setup.sh): the tests that use this repository are marked `tools`.
REPO: dict[str, list[dict[str, str]]] = {
    "stable": [
        {
            "Package": "app",
            "Version": "1.0",
            "Architecture": "amd64",
            "Pre-Depends": "base",
            "Depends": "libfoo (>= 1.0) | libalt, mail-transport-agent, python3:any (>= 3.9)",
        },
        {"Package": "libfoo", "Version": "2.5", "Architecture": "amd64", "Depends": "app"},
        {"Package": "libalt", "Version": "1.0", "Architecture": "amd64"},
        {
            "Package": "postfix-lite",
            "Version": "1.0",
            "Architecture": "amd64",
            "Priority": "optional",
            "Provides": "mail-transport-agent (= 1)",
        },
        {
            "Package": "exim-lite",
            "Version": "1.0",
            "Architecture": "amd64",
            "Priority": "standard",
            "Provides": "mail-transport-agent",
        },
        {"Package": "python3", "Version": "3.11.2-1", "Architecture": "all"},
        {
            "Package": "base",
            "Version": "1.0",
            "Architecture": "amd64",
            "Essential": "yes",
            "Priority": "required",
        },
        {"Package": "libc-stub", "Version": "1.0", "Architecture": "amd64"},
        {
            "Package": "broken",
            "Version": "1.0",
            "Architecture": "amd64",
            "Depends": "does-not-exist | nor-this",
        },
    ],
    # Epoch 1 makes 1:2.0-1 newer than 2.5, which a plain string comparison gets wrong.
    "stable-updates": [
        {
            "Package": "libfoo",
            "Version": "1:2.0-1",
            "Architecture": "amd64",
            "Source": "foo (1:2.0-1)",
            "Depends": "app, libc-stub",
        },
    ],
}


# ------------------------------------------------------------------------ fake repository


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_deb(control: dict[str, str], pool: Path) -> Path:
    tree = pool / f"tree-{control['Package']}-{control['Version']}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "usr/share/doc" / control["Package"]).mkdir(parents=True)
    (tree / "usr/share/doc" / control["Package"] / "README").write_text("test\n")
    fields = {"Maintainer": "Test <test@example.org>", **control}
    fields.setdefault("Description", "test package")
    text = "".join(f"{key}: {value}\n" for key, value in fields.items())
    (tree / "DEBIAN/control").write_text(text)
    version = control["Version"].split(":")[-1]
    deb = pool / f"{control['Package']}_{version}_{control['Architecture']}.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(tree)
    return deb


def packages_text(root: Path, stanzas: list[dict[str, str]], pool: Path) -> str:
    paragraphs = []
    for control in stanzas:
        deb = build_deb(control, pool)
        data = deb.read_bytes()
        fields = {
            **control,
            "Filename": str(deb.relative_to(root)),
            "Size": str(len(data)),
            "SHA256": sha256_hex(data),
        }
        paragraphs.append("".join(f"{k}: {v}\n" for k, v in fields.items()))
    return "\n".join(paragraphs)


def write_release(dists: Path, files: dict[str, bytes]) -> None:
    lines = [f"Suite: {dists.name}", "Architectures: amd64", "Components: main", "SHA256:"]
    lines += [f" {sha256_hex(data)} {len(data)} {name}" for name, data in files.items()]
    (dists / "Release").write_text("\n".join(lines) + "\n")


def write_suite(root: Path, suite: str, stanzas: list[dict[str, str]]) -> None:
    """A suite like Debian's: Release lists several compressions, the mirror serves some.

    `stable` serves Packages.xz; `stable-updates` lists Packages.xz but serves only .gz, so
    the fallback after a 404 is exercised. Neither serves the uncompressed file, like Debian.
    """
    pool = root / "pool" / suite
    pool.mkdir(parents=True, exist_ok=True)
    raw = packages_text(root, stanzas, pool).encode()
    dists = root / "dists" / suite
    binary = dists / "main/binary-amd64"
    binary.mkdir(parents=True, exist_ok=True)
    xz, gz = lzma.compress(raw), gzip.compress(raw, mtime=0)
    listed = {"main/binary-amd64/Packages": raw, "main/binary-amd64/Packages.xz": xz}
    if suite == "stable-updates":
        listed["main/binary-amd64/Packages.gz"] = gz
        (binary / "Packages.gz").write_bytes(gz)
    else:
        (binary / "Packages.xz").write_bytes(xz)
    write_release(dists, listed)


def build_repo(root: Path) -> Path:
    for suite, stanzas in REPO.items():
        write_suite(root, suite, stanzas)
    return root


class Server:
    """A real HTTP server over a directory, remembering every requested path."""

    def __init__(self, root: Path) -> None:
        requests_seen: list[str] = []
        self.requests = requests_seen

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                requests_seen.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
        )
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def local_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # never route 127.0.0.1 through a proxy from the environment
    return session


@pytest.fixture(scope="module")
def repo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = build_repo(tmp_path_factory.mktemp("repo"))
    with Server(root) as server:
        yield server


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    """A private repository that a test may change."""
    root = build_repo(tmp_path / "repo")
    with Server(root) as server:
        yield server, root


def sources_for(url: str) -> list[Source]:
    return [Source(url, "stable", ("main",)), Source(url, "stable-updates", ("main",))]


def make_archive(url: str, cache: Path, **kwargs: Any) -> Archive:
    return Archive(sources_for(url), cache_dir=cache, session=local_session(), **kwargs)


@pytest.fixture
def archive(repo_server: Server, tmp_path: Path) -> Archive:
    return make_archive(repo_server.url, tmp_path / "cache")


def names(packages: list[BinaryPackage]) -> list[str]:
    return [p.name for p in packages]


# ------------------------------------------------------------------------ package()


@pytest.mark.tools
def test_package_picks_newest_version_by_debian_ordering(archive: Archive) -> None:
    pkg = archive.package("libfoo")
    assert pkg.version == "1:2.0-1"
    assert pkg.suite == "stable-updates"
    assert pkg.source == "foo"
    assert pkg.deb_name == "libfoo_1%3a2.0-1_amd64.deb"
    assert pkg.url == f"{pkg.uri}/{pkg.filename}"


@pytest.mark.tools
def test_package_fields(archive: Archive) -> None:
    app = archive.package("app")
    assert app.pre_depends == "base"
    assert app.depends.startswith("libfoo (>= 1.0) | libalt")
    assert app.source == "app"
    base = archive.package("base")
    assert base.essential and base.priority == "required"
    assert archive.package("python3").architecture == "all"


@pytest.mark.tools
def test_unknown_package_names_it_and_the_suites(archive: Archive) -> None:
    with pytest.raises(QlimageError) as err:
        archive.package("no-such-package")
    message = str(err.value)
    assert "no-such-package" in message
    assert "stable (main)" in message and "stable-updates (main)" in message


@pytest.mark.tools
def test_virtual_package_hint_names_providers(archive: Archive) -> None:
    with pytest.raises(QlimageError) as err:
        archive.package("mail-transport-agent")
    assert err.value.hint is not None and "exim-lite, postfix-lite" in err.value.hint


# ------------------------------------------------------------------------ closure()


def test_relation_names_drop_versions_and_arch_qualifiers() -> None:
    assert relation_names("a (>= 1) | b:any, c:amd64 (<< 2),  d") == [["a", "b"], ["c"], ["d"]]
    assert relation_names("") == []


@pytest.mark.tools
def test_closure_follows_alternatives_provides_and_cycles(archive: Archive) -> None:
    result = archive.closure(["app"])
    # libfoo is the first real alternative (libalt is not taken); the cycle libfoo -> app ends;
    # mail-transport-agent goes to its higher-priority provider; python3:any is python3.
    assert names(result) == ["app", "base", "exim-lite", "libc-stub", "libfoo", "python3"]
    assert next(p for p in result if p.name == "libfoo").version == "1:2.0-1"


@pytest.mark.tools
def test_closure_keeps_an_explicitly_requested_provider(archive: Archive) -> None:
    assert "exim-lite" not in names(archive.closure(["app", "postfix-lite"]))


@pytest.mark.tools
def test_closure_is_deterministic(archive: Archive) -> None:
    assert archive.closure(["python3", "app"]) == archive.closure(["app", "python3", "app"])


@pytest.mark.tools
def test_closure_exclude_is_neither_returned_nor_followed(archive: Archive) -> None:
    result = archive.closure(["app"], exclude=["libfoo", "base", "mail-transport-agent"])
    # libfoo excluded: libc-stub (only its dependency) is not followed and libalt not pulled
    # in its place; an excluded virtual name satisfies the Depends on it.
    assert names(result) == ["app", "python3"]


@pytest.mark.tools
def test_closure_exclude_of_a_provider_satisfies_the_virtual(archive: Archive) -> None:
    assert names(archive.closure(["app"], exclude=["postfix-lite"])) == [
        "app",
        "base",
        "libc-stub",
        "libfoo",
        "python3",
    ]


@pytest.mark.tools
def test_closure_unsatisfiable_dependency(archive: Archive) -> None:
    with pytest.raises(QlimageError, match=r"broken 1\.0: dependency 'does-not-exist \| nor-this'"):
        archive.closure(["broken"])


@pytest.mark.tools
def test_closure_unknown_requested_name(archive: Archive) -> None:
    with pytest.raises(QlimageError, match="nothing-like-this"):
        archive.closure(["app", "nothing-like-this"])


# ------------------------------------------------------------------------ download()


@pytest.mark.tools
def test_download_verifies_and_reuses_the_cache(repo_server: Server, archive: Archive) -> None:
    pkg = archive.package("libfoo")
    path = archive.download(pkg)
    assert path == archive.cache_dir / "debs" / "libfoo_1%3a2.0-1_amd64.deb"
    assert sha256_hex(path.read_bytes()) == pkg.sha256
    assert DebFile(str(path)).debcontrol()["Version"] == "1:2.0-1"
    before = len(repo_server.requests)
    assert archive.download(pkg) == path
    assert len(repo_server.requests) == before  # reused, no request


@pytest.mark.tools
def test_download_all_returns_each_verified_deb_in_order(
    repo_server: Server, archive: Archive
) -> None:
    """What recipes use: one progress line for the closure, the .debs in the closure's order,
    the cached ones reused."""
    cached = archive.package("libfoo")
    archive.download(cached)
    pkgs = [archive.package(n) for n in ("app", "libfoo", "base")]
    before = len(repo_server.requests)
    paths = archive.download_all(pkgs)
    assert paths == [archive.cache_dir / "debs" / p.deb_name for p in pkgs]
    assert all(
        sha256_hex(path.read_bytes()) == p.sha256 for p, path in zip(pkgs, paths, strict=True)
    )
    assert len(repo_server.requests) == before + 2  # libfoo was cached


@pytest.mark.tools
def test_download_replaces_a_damaged_cached_file(repo_server: Server, archive: Archive) -> None:
    pkg = archive.package("python3")
    path = archive.download(pkg)
    path.write_bytes(b"garbage")
    assert archive.download(pkg) == path
    assert sha256_hex(path.read_bytes()) == pkg.sha256


@pytest.mark.tools
def test_download_sha_mismatch_leaves_nothing_behind(archive: Archive) -> None:
    good = archive.package("app")
    bad = dataclasses.replace(good, sha256="0" * 64)
    with pytest.raises(QlimageError) as err:
        archive.download(bad)
    message = str(err.value)
    assert good.url in message and "0" * 64 in message and good.sha256 in message
    debs = archive.cache_dir / "debs"
    assert not (debs / good.deb_name).exists()
    assert list(debs.iterdir()) == []  # no temp file left either


@pytest.mark.tools
def test_download_missing_file(archive: Archive) -> None:
    pkg = dataclasses.replace(archive.package("app"), filename="pool/nowhere/app.deb")
    with pytest.raises(QlimageError, match="HTTP 404"):
        archive.download(pkg)


# ------------------------------------------------------------------------ indexes


@pytest.mark.tools
def test_index_fetch_uses_release_and_compression_fallback(
    repo_server: Server, tmp_path: Path
) -> None:
    make_archive(repo_server.url, tmp_path / "cache").package("app")
    seen = set(repo_server.requests)
    assert "/dists/stable/InRelease" in seen and "/dists/stable/Release" in seen
    assert "/dists/stable/main/binary-amd64/Packages.xz" in seen
    # stable-updates lists Packages.xz but serves only .gz
    assert "/dists/stable-updates/main/binary-amd64/Packages.gz" in seen
    indexes = tmp_path / "cache/indexes"
    cached = sorted(str(p.relative_to(indexes)) for p in indexes.rglob("*") if p.is_file())
    parsed = [name for name in cached if name.endswith(archive_mod.PARSED_SUFFIX)]
    assert len(cached) == 4 + len(parsed) and all(".part" not in name for name in cached)


@pytest.mark.tools
def test_index_cache_reused_while_fresh(repo_server: Server, tmp_path: Path) -> None:
    make_archive(repo_server.url, tmp_path / "cache").package("app")
    before = len(repo_server.requests)
    assert make_archive(repo_server.url, tmp_path / "cache").package("app").version == "1.0"
    assert len(repo_server.requests) == before


@pytest.mark.tools
def test_parsed_index_is_reused_while_the_index_is_the_same_file(
    repo_server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Debian main index takes python-debian seconds to parse: the next process reads the
    parsed copy beside it instead, with the same packages; a damaged copy is parsed again."""
    first = make_archive(repo_server.url, tmp_path / "cache")
    packages = {name: first.package(name) for name in ("app", "libfoo", "base", "python3")}
    copies = list((tmp_path / "cache").rglob("*" + archive_mod.PARSED_SUFFIX))
    assert len(copies) == 2  # one per suite

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the index was parsed again")

    with monkeypatch.context() as m:
        m.setattr(archive_mod.Packages, "iter_paragraphs", refuse)
        again = make_archive(repo_server.url, tmp_path / "cache")
        assert {name: again.package(name) for name in packages} == packages
    copies[0].write_text('{"key": "torn')
    again = make_archive(repo_server.url, tmp_path / "cache")
    assert {name: again.package(name) for name in packages} == packages


@pytest.mark.tools
def test_stale_index_is_refetched(fresh_server: tuple[Server, Path], tmp_path: Path) -> None:
    server, root = fresh_server
    cache = tmp_path / "cache"
    make_archive(server.url, cache).package("app")
    # An unchanged Packages file is not downloaded again, only the Release files are.
    server.requests.clear()
    make_archive(server.url, cache, max_index_age=0).package("app")
    assert all("/Packages" not in path for path in server.requests)
    assert "/dists/stable/Release" in server.requests

    newer = [{**REPO["stable"][0], "Version": "1.1"}, *REPO["stable"][1:]]
    write_suite(root, "stable", newer)
    assert make_archive(server.url, cache).package("app").version == "1.0"  # still fresh
    assert make_archive(server.url, cache, max_index_age=0).package("app").version == "1.1"


@pytest.mark.tools
def test_index_sha_mismatch(fresh_server: tuple[Server, Path], tmp_path: Path) -> None:
    server, root = fresh_server
    (root / "dists/stable/main/binary-amd64/Packages.xz").write_bytes(lzma.compress(b""))
    with pytest.raises(QlimageError, match="SHA256 mismatch") as err:
        make_archive(server.url, tmp_path / "cache").package("app")
    assert f"{server.url}/dists/stable/main/binary-amd64/Packages.xz" in str(err.value)
    assert not list((tmp_path / "cache").rglob("Packages*"))


@pytest.mark.tools
def test_inrelease_armour_is_stripped(fresh_server: tuple[Server, Path], tmp_path: Path) -> None:
    server, root = fresh_server
    dists = root / "dists/stable"
    (dists / "InRelease").write_text(clearsigned((dists / "Release").read_text()))
    archive = make_archive(server.url, tmp_path / "cache", keyring=None)  # no gpgv check
    assert archive.package("app").version == "1.0"
    index_dirs = list((tmp_path / "cache/indexes").iterdir())
    assert any((d / "InRelease").is_file() for d in index_dirs)


@pytest.mark.tools
def test_inrelease_with_bad_signature_fails(
    fresh_server: tuple[Server, Path], tmp_path: Path
) -> None:
    server, root = fresh_server
    dists = root / "dists/stable"
    (dists / "InRelease").write_text(clearsigned((dists / "Release").read_text()))
    with pytest.raises(QlimageError, match="signature does not verify"):
        make_archive(server.url, tmp_path / "cache").package("app")
    assert not list((tmp_path / "cache").rglob("InRelease*"))


def clearsigned(text: str) -> str:
    """A clearsigned-looking document whose signature is garbage."""
    return (
        "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n"
        + text
        + "-----BEGIN PGP SIGNATURE-----\n\niQIzBAEBCAAdFiEEbogus0000000000000000000000000000=\n"
        "=AAAA\n-----END PGP SIGNATURE-----\n"
    )


def test_unreachable_mirror(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    archive = make_archive(f"http://127.0.0.1:{port}", tmp_path / "cache")
    with pytest.raises(QlimageError) as err:
        archive.package("app")
    assert f"http://127.0.0.1:{port}/dists/stable/InRelease" in str(err.value)
    assert err.value.hint is not None and "mirror" in err.value.hint
    assert "\n" not in err.value.message


@pytest.mark.tools
def test_unknown_suite(repo_server: Server, tmp_path: Path) -> None:
    archive = Archive(
        [Source(repo_server.url, "nope", ("main",))],
        cache_dir=tmp_path / "cache",
        session=local_session(),
    )
    with pytest.raises(QlimageError, match="neither InRelease nor Release"):
        archive.package("app")


def test_no_sources_is_an_error() -> None:
    with pytest.raises(QlimageError, match="no Debian archive sources"):
        Archive([])


# ------------------------------------------------------------------------ host_sources()

SOURCES_LIST = """\
# main archive
deb http://deb.debian.org/debian bookworm main contrib
deb-src http://deb.debian.org/debian bookworm main
deb [arch=amd64 signed-by=/etc/g.gpg] https://packages.cloud.google.com/apt cloud-sdk main
deb [ arch=amd64 ] http://deb.debian.org/debian-security/ bookworm-security main # trailing
#deb http://deb.debian.org/debian bookworm-backports main
deb file:/srv/debian bookworm main
deb http://deb.debian.org/debian bookworm main contrib
"""

DEBIAN_SOURCES = """\
Types: deb deb-src
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Enabled: no

Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main

Types: deb
URIs: http://snapshot.debian.org/archive/debian/20250520T000000Z/
Suites: bookworm
Components: main non-free-firmware
"""

NODESOURCE_SOURCES = """\
Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
Architectures: amd64
Signed-By: /usr/share/keyrings/nodesource.gpg
"""


def test_host_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(SOURCES_LIST)
    (tmp_path / "sources.list.d/debian.sources").write_text(DEBIAN_SOURCES)
    (tmp_path / "sources.list.d/nodesource.sources").write_text(NODESOURCE_SOURCES)
    (tmp_path / "sources.list.d/google.list").write_text(
        "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n"
    )
    (tmp_path / "sources.list.d/old.list.disabled").write_text(
        "deb http://deb.debian.org/debian buster main\n"
    )
    assert host_sources(tmp_path) == [
        Source("http://deb.debian.org/debian", "bookworm", ("main", "contrib")),
        Source("http://deb.debian.org/debian-security", "bookworm-security", ("main",)),
        Source("http://deb.debian.org/debian", "bookworm", ("main",)),
        Source("http://deb.debian.org/debian", "bookworm-updates", ("main",)),
        Source(
            "http://snapshot.debian.org/archive/debian/20250520T000000Z",
            "bookworm",
            ("main", "non-free-firmware"),
        ),
    ]


def test_host_sources_without_any_files(tmp_path: Path) -> None:
    assert host_sources(tmp_path) == []


# ------------------------------------------------------------------------ the real archive


@pytest.mark.network
def test_real_archive_busybox_static() -> None:
    sources = host_sources()
    assert sources, "the build host has no Debian apt sources"
    archive = Archive(sources)  # the real default cache, so later runs are fast
    packages = archive.closure(["busybox-static"])
    assert "busybox-static" in names(packages)
    pkg = archive.package("busybox-static")
    path = archive.download(pkg)
    assert path.parent == Path("~/.cache/qlimage/debs").expanduser()
    deb = DebFile(str(path))
    assert deb.debcontrol()["Package"] == "busybox-static"
    assert deb.debcontrol()["Version"] == pkg.version
    assert any(name.endswith("bin/busybox") for name in deb.data.tgz().getnames())
