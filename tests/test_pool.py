"""Module pool: reading module .debs (built for real with build_deb) and version resolution."""

from __future__ import annotations

import gzip
import hashlib
import stat
from pathlib import Path

import pytest

from qlimage.errors import QlimageError
from qlimage.pool import packages as pool_mod
from qlimage.pool.debpack import build_deb
from qlimage.pool.packages import (
    ModulePackage,
    module_changelog,
    module_files,
    read_module,
    resolve,
    scan_pool,
    version_matches,
)

pytestmark = pytest.mark.tools

EPOCH = 1_700_000_000

CHANGELOG = """\
qlustar-module-core-bookworm (11.0.1-1) bookworm; urgency=medium

  * Newer kernel.

 -- Qlustar Team <admin@example.org>  Tue, 14 Nov 2023 22:13:20 +0000
"""


def make_deb(
    directory: Path,
    package: str,
    version: str,
    *,
    files: dict[str, bytes] | None = None,
    fields: dict[str, str] | None = None,
) -> Path:
    tree = directory.parent / "trees" / f"{package}_{version}"
    tree.mkdir(parents=True)
    for rel, content in (files or {"etc/qlustar/version": version.encode()}).items():
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    control = {
        "Package": package,
        "Version": version,
        "Architecture": "amd64",
        "Maintainer": "Qlustar Team <admin@example.org>",
        "Description": f"{package} test module",
        **(fields or {}),
    }
    filename = f"{package}_{version.replace(':', '%3a')}_amd64.deb"
    return build_deb(tree, control, directory / filename, source_date_epoch=EPOCH)


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pool") / "pool"
    directory.mkdir()
    core = "qlustar-module-core-bookworm"
    for version in ["10.9.9", "11.0.0", "11.0.10", "11.1.0", "11.10.0", "11.0.9", "1:9.0"]:
        make_deb(directory, core, version)
    make_deb(
        directory,
        core,
        "11.0.1-1",
        files={
            f"usr/share/doc/{core}/changelog.Debian.gz": gzip.compress(CHANGELOG.encode(), mtime=0),
            "etc/qlustar/version": b"11.0.1-1",
        },
    )
    make_deb(directory, "qlustar-module-core-jammy", "11.0.2")
    make_deb(directory, "qlustar-module-slurm-client-bookworm", "11.0.0")
    # Control fields win over the name.
    make_deb(
        directory,
        "site-extras",
        "2.0",
        fields={"Qlustar-Module": "extras", "Qlustar-Flavor": "bookworm"},
    )
    make_deb(directory, "hello", "1.0")  # not a module
    (directory / "subdir").mkdir()
    make_deb(directory / "subdir", "qlustar-module-nested-bookworm", "1.0")  # not scanned
    return directory


@pytest.fixture(scope="module")
def pool(pool_dir: Path) -> list[ModulePackage]:
    return scan_pool(pool_dir)


# --- scanning ------------------------------------------------------------------------------


def test_scan_pool_order_and_parsing(pool: list[ModulePackage]) -> None:
    assert [(m.module, m.flavor, m.version) for m in pool] == [
        ("core", "bookworm", "10.9.9"),
        ("core", "bookworm", "11.0.0"),
        ("core", "bookworm", "11.0.1-1"),
        ("core", "bookworm", "11.0.9"),
        ("core", "bookworm", "11.0.10"),
        ("core", "bookworm", "11.1.0"),
        ("core", "bookworm", "11.10.0"),
        ("core", "bookworm", "1:9.0"),  # the epoch outranks everything
        ("core", "jammy", "11.0.2"),
        ("extras", "bookworm", "2.0"),
        ("slurm-client", "bookworm", "11.0.0"),
    ]
    extras = next(m for m in pool if m.module == "extras")
    assert extras.package == "site-extras"
    assert extras.path.name == "site-extras_2.0_amd64.deb"


def test_scan_missing_directory_is_empty(tmp_path: Path) -> None:
    assert scan_pool(tmp_path / "nope") == []


def test_scan_reuses_cached_control(pool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scan_pool(pool_dir)  # fill the cache (other tests may have run first)

    def fail(path: Path) -> dict[str, str]:
        raise AssertionError(f"{path} parsed again")

    monkeypatch.setattr(pool_mod, "parse_control", fail)
    assert len(scan_pool(pool_dir)) == 11


def test_scan_sees_a_rebuilt_package(tmp_path: Path) -> None:
    directory = tmp_path / "pool"
    deb = make_deb(directory, "qlustar-module-core-bookworm", "1.0")
    assert [m.version for m in scan_pool(directory)] == ["1.0"]
    other = make_deb(tmp_path / "other", "qlustar-module-core-bookworm", "1.1")
    other.replace(deb)
    assert [m.version for m in scan_pool(directory)] == ["1.1"]


def test_scan_rejects_broken_deb(tmp_path: Path) -> None:
    (tmp_path / "broken.deb").write_bytes(b"!<arch>\ngarbage")
    with pytest.raises(QlimageError, match=r"broken\.deb"):
        scan_pool(tmp_path)


def test_read_module(pool_dir: Path) -> None:
    deb = pool_dir / "qlustar-module-slurm-client-bookworm_11.0.0_amd64.deb"
    assert read_module(deb) == ModulePackage(
        package="qlustar-module-slurm-client-bookworm",
        module="slurm-client",
        flavor="bookworm",
        version="11.0.0",
        path=deb,
    )


def test_read_module_rejects_non_module(pool_dir: Path) -> None:
    with pytest.raises(QlimageError, match=r"hello_1\.0_amd64\.deb.*not a module"):
        read_module(pool_dir / "hello_1.0_amd64.deb")


@pytest.mark.parametrize("content", [b"", b"not a deb at all", b"!<arch>\n"])
def test_read_module_rejects_unreadable(tmp_path: Path, content: bytes) -> None:
    deb = tmp_path / "junk.deb"
    deb.write_bytes(content)
    with pytest.raises(QlimageError, match=r"junk\.deb"):
        read_module(deb)


def test_read_module_missing_file(tmp_path: Path) -> None:
    with pytest.raises(QlimageError, match=r"gone\.deb"):
        read_module(tmp_path / "gone.deb")


@pytest.mark.parametrize(
    ("package", "fields", "expected"),
    [
        ("qlustar-module-core-bookworm", {}, ("core", "bookworm")),
        ("qlustar-module-slurm-client-bookworm", {}, ("slurm-client", "bookworm")),
        ("qlustar-module-ofed-x-bookworm", {"Qlustar-Module": "ofed"}, ("ofed", "bookworm")),
        ("qlustar-module-a-b-el-9", {"Qlustar-Flavor": "el-9"}, ("a-b", "el-9")),
        ("anything", {"Qlustar-Module": "m", "Qlustar-Flavor": "f"}, ("m", "f")),
        ("anything", {"qlustar-module": "m", "QLUSTAR-FLAVOR": "f"}, ("m", "f")),
        ("qlustar-module-core", {}, None),
        ("anything", {"Qlustar-Module": "m"}, None),
        ("hello", {}, None),
    ],
)
def test_module_from_control(
    package: str, fields: dict[str, str], expected: tuple[str, str] | None
) -> None:
    control = {"Package": package, "Version": "1.0", **fields}
    module = pool_mod.module_from_control(Path("x.deb"), control)
    assert (module and (module.module, module.flavor)) == expected


# --- versions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "version", "expected"),
    [
        ("11", "11.0.0", True),
        ("11", "11.10.3-2", True),
        ("11", "11", True),
        ("11", "110.0", False),
        ("11", "1.1", False),
        ("11", "111", False),
        ("11", "10.9.9", False),
        ("11", "1:11.0.0", True),  # no epoch requested: any epoch
        ("11.0", "11.0.10", True),
        ("11.0", "11.0", True),
        ("11.0", "11.00.1", True),  # numerically equal components
        ("11.0", "11.1.0", False),
        ("11.0", "11.01.0", False),
        ("11.0", "11.10.0", False),
        ("11.0", "11", False),
        ("11.0.0", "11.0.0", True),
        ("11.0.0", "11.0.0-3", True),
        ("11.0.0", "11.0.0.1", False),  # exact, not a prefix
        ("11.0.1", "11.0.01", True),
        ("11.0.0", "11.0.1", False),
        ("11.0.0", "11.0.10", False),
        ("11.0.1", "11.0.10", False),
        ("11.0.0-2", "11.0.0-2", True),
        ("11.0.0-2", "11.0.0-3", False),
        ("11.0.0-2", "11.0.0", False),
        ("1:9.0", "1:9.0", True),
        ("1:9", "9.0", False),
        ("9", "1:9.0", True),
        ("2.4", "2.4.1+dfsg-1", True),
    ],
)
def test_version_matches(requested: str, version: str, expected: bool) -> None:
    assert version_matches(requested, version) is expected


def test_version_matches_rejects_empty_request() -> None:
    with pytest.raises(ValueError):
        version_matches(" ", "1.0")


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("11", "11.10.0"),
        ("11.0", "11.0.10"),  # 11.0.10 is newer than 11.0.9
        ("11.1", "11.1.0"),
        ("11.0.0", "11.0.0"),
        ("11.0.1", "11.0.1-1"),
        ("11.0.1-1", "11.0.1-1"),
        ("11.0.9", "11.0.9"),
        ("10", "10.9.9"),
        ("9", "1:9.0"),
        ("1:9.0", "1:9.0"),
    ],
)
def test_resolve_picks_newest_match(
    pool: list[ModulePackage], requested: str, expected: str
) -> None:
    found = resolve(pool, "core", "bookworm", requested)
    assert (found.module, found.flavor, found.version) == ("core", "bookworm", expected)
    assert found.path.is_file()


def test_resolve_respects_flavor(pool: list[ModulePackage]) -> None:
    assert resolve(pool, "core", "jammy", "11").version == "11.0.2"
    assert resolve(pool, "slurm-client", "bookworm", "11.0").version == "11.0.0"


def test_resolve_unknown_module_lists_modules(pool: list[ModulePackage]) -> None:
    with pytest.raises(QlimageError) as exc:
        resolve(pool, "lustre", "bookworm", "11")
    message = str(exc.value)
    assert "lustre" in message and "bookworm" in message
    assert "core, extras, slurm-client" in message


def test_resolve_module_missing_for_flavor(pool: list[ModulePackage]) -> None:
    with pytest.raises(QlimageError, match=r"slurm-client.*jammy.*: core$"):
        resolve(pool, "slurm-client", "jammy", "11")


def test_resolve_unknown_flavor_lists_flavors(pool: list[ModulePackage]) -> None:
    with pytest.raises(QlimageError, match=r"trixie.*bookworm, jammy"):
        resolve(pool, "core", "trixie", "11")


def test_resolve_empty_pool() -> None:
    with pytest.raises(QlimageError, match="empty"):
        resolve([], "core", "bookworm", "11")


def test_resolve_no_matching_version_lists_versions(pool: list[ModulePackage]) -> None:
    with pytest.raises(QlimageError) as exc:
        resolve(pool, "core", "bookworm", "12")
    message = str(exc.value)
    assert "core" in message and "bookworm" in message and "'12'" in message
    assert message.endswith("10.9.9, 11.0.0, 11.0.1-1, 11.0.9, 11.0.10, 11.1.0, 11.10.0, 1:9.0")


def test_resolve_traps(pool: list[ModulePackage]) -> None:
    # "1" must not pick up 11.x or 10.x, "11.1" must not pick 11.10.0.
    with pytest.raises(QlimageError):
        resolve(pool, "core", "bookworm", "1")
    assert resolve(pool, "core", "bookworm", "11.1").version == "11.1.0"


def test_resolve_duplicate_version_is_an_error(pool: list[ModulePackage]) -> None:
    best = resolve(pool, "core", "bookworm", "11")
    twin = ModulePackage(best.package, best.module, best.flavor, best.version, Path("copy.deb"))
    with pytest.raises(QlimageError, match="twice"):
        resolve([*pool, twin], "core", "bookworm", "11")


# --- contents ------------------------------------------------------------------------------


def test_module_files(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/tool").write_bytes(b"#!/bin/sh\n")
    (tree / "usr/bin/tool").chmod(0o755)
    (tree / "usr/bin/alias").symlink_to("tool")
    (tree / "etc").mkdir()
    (tree / "etc/conf").write_bytes(b"x=1\n")
    (tree / "etc/conf").chmod(0o640)
    (tree / "etc/same").hardlink_to(tree / "etc/conf")
    (tree / "var/empty").mkdir(parents=True)
    for rel in ["", "usr", "usr/bin", "etc", "var", "var/empty"]:
        (tree / rel).chmod(0o755)
    control = {
        "Package": "qlustar-module-tools-bookworm",
        "Version": "1.0",
        "Architecture": "amd64",
        "Maintainer": "Qlustar Team <admin@example.org>",
        "Description": "tools",
    }
    deb = build_deb(tree, control, tmp_path / "tools.deb", source_date_epoch=EPOCH)

    conf = hashlib.sha256(b"x=1\n").hexdigest()
    d, f = stat.S_IFDIR, stat.S_IFREG
    assert module_files(deb) == [
        ("etc", d | 0o755, ""),
        ("etc/conf", f | 0o640, conf),
        ("etc/same", f | 0o640, conf),
        ("usr", d | 0o755, ""),
        ("usr/bin", d | 0o755, ""),
        ("usr/bin/alias", stat.S_IFLNK | 0o777, "tool"),
        ("usr/bin/tool", f | 0o755, hashlib.sha256(b"#!/bin/sh\n").hexdigest()),
        ("var", d | 0o755, ""),
        ("var/empty", d | 0o755, ""),
    ]


def test_module_files_unreadable(tmp_path: Path) -> None:
    (tmp_path / "junk.deb").write_bytes(b"junk")
    with pytest.raises(QlimageError, match=r"junk\.deb"):
        module_files(tmp_path / "junk.deb")


def test_module_changelog(pool: list[ModulePackage]) -> None:
    with_log = resolve(pool, "core", "bookworm", "11.0.1")
    text = module_changelog(with_log.path)
    assert text is not None
    assert text.startswith("qlustar-module-core-bookworm (11.0.1-1) bookworm; urgency=medium")
    assert "* Newer kernel." in text


def test_module_changelog_absent(pool: list[ModulePackage]) -> None:
    assert module_changelog(resolve(pool, "core", "bookworm", "11.0.0").path) is None
