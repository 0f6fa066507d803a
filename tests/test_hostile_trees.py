"""Bad-input corpus, trees (issue 8, classes 1 and 7): module packages, overlays, whiteouts and
Root FS trees never make a read, write or delete leave their tree, and overlays keep what the
README promises (hard links; a whiteout removes a link itself, dangling or not).

Module packages with unsafe archives are refused before any task (validate and build), naming
the package file and the member. Links that an image legitimately holds (etc/shadow or a doc
directory pointing elsewhere) are resolved inside the image, never on the head: the build
succeeds, the sentinel tree outside is unchanged, and neither a served file nor a file in the
built squashfs image holds its text.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from qlimage.pool.debpack import build_deb

from helpers import (
    SENTINEL_MARK,
    assert_no_sentinel_text,
    assert_refused,
    qlimage,
    tree_listing,
    write_site,
)

pytestmark = [pytest.mark.tools]

EPOCH = 1700000000
HEAD_HASH = "$6$headsalt$HEADHASHheadhashHEADHASHheadhash"
CORE = "qlustar-module-core-bookworm"
EVIL = "qlustar-module-evil-bookworm"


# --- module packages -------------------------------------------------------------------------


def control(package: str, version: str) -> dict[str, str]:
    return {
        "Package": package,
        "Version": version,
        "Architecture": "amd64",
        "Maintainer": "t <t@example.org>",
        "Description": "test module",
    }


def module_deb(pool: Path, name: str, files: dict[str, str], links: dict[str, str]) -> Path:
    """A module .deb built with dpkg-deb from a tree with `files` and symlinks `links`."""
    tree = pool.parent / f"tree-{name}"
    listing = f"usr/share/qlustar/modules/{name}.packages"
    if listing not in links:
        files = {**files, listing: "busybox-static 1.0\n"}
    for rel, text in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    for rel, target in links.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, tree / rel)
    package = f"qlustar-module-{name}-bookworm"
    out = pool / f"{package}_11.0.0_amd64.deb"
    return build_deb(tree, control(package, "11.0.0"), out, source_date_epoch=EPOCH)


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            info.mtime = EPOCH
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"x\n", link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def hostile_deb(pool: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    """A module .deb whose data.tar.gz holds exactly `members` (made by hand: no tool would)."""
    work = pool.parent / "hostile-deb"
    work.mkdir()
    text = "".join(f"{k}: {v}\n" for k, v in control(EVIL, "11.0.0").items()).encode()
    ctl = tarfile.TarInfo("./control")
    ctl.size = len(text)
    (work / "debian-binary").write_text("2.0\n")
    (work / "control.tar.gz").write_bytes(tar_gz([(ctl, text)]))
    base = [member("./", tarfile.DIRTYPE, b"")]
    (work / "data.tar.gz").write_bytes(tar_gz(base + members))
    out = pool / f"{EVIL}_11.0.0_amd64.deb"
    subprocess.run(
        ["ar", "rc", str(out), "debian-binary", "control.tar.gz", "data.tar.gz"],
        cwd=work,
        check=True,
    )
    return out


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """The build site with local modules only (core and evil), no network."""
    root = write_site(tmp_path / "site")
    subprocess.run(["rm", "-rf", str(root / "modules/core")], check=True)
    use_modules(root, "core")
    shadow = root / "head-shadow"
    shadow.write_text(f"root:{HEAD_HASH}:19000:0:99999:7:::\n")
    os.chmod(shadow, 0o600)
    text = (root / "site.toml").read_text().replace("[head]\n", '[head]\nshadow = "head-shadow"\n')
    (root / "site.toml").write_text(text)
    pool = root / "modules/pool"
    pool.mkdir(parents=True)
    module_deb(
        pool,
        "core",
        {
            "etc/group": "root:x:0:\nshadow:x:42:\n",
            "etc/shadow": "root:*:19000:0:99999:7:::\n",
            "usr/share/doc/core-readme": "core\n",
        },
        {},
    )
    return root


def use_modules(site: Path, *modules: str) -> None:
    names = ", ".join(f'"{m}"' for m in modules)
    (site / "images.d/demo.toml").write_text(
        f'name = "demo"\nflavor = "bookworm"\nversion = "11"\nmodules = [{names}]\n'
    )


def add_evil(site: Path, files: dict[str, str], links: dict[str, str]) -> None:
    """The evil module, after core in the image (its files win)."""
    module_deb(site / "modules/pool", "evil", files, links)
    use_modules(site, "core", "evil")


def build_images(site: Path) -> subprocess.CompletedProcess[str]:
    return qlimage("-C", str(site), "build", "squashfs")


def image_of(site: Path) -> Path:
    return site / "bootfiles/qlustar/images/demo/current/demo.img"


def unpack(site: Path, dest: Path) -> Path:
    subprocess.run(["unsquashfs", "-q", "-n", "-d", str(dest), str(image_of(site))], check=True)
    return dest


def assert_nothing_leaked(site: Path, sentinel: Path, before: dict[str, str], tmp: Path) -> None:
    """The sentinel tree is unchanged, and no served file nor any file in the image holds its
    text (the image is unpacked: its files are compressed inside the squashfs)."""
    assert tree_listing(sentinel) == before, "the sentinel tree outside the site changed"
    assert_no_sentinel_text(site / "bootfiles")
    root = unpack(site, tmp / "unpacked")
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if path.suffix == ".gz":
                data = gzip.decompress(data)
            assert SENTINEL_MARK not in data, path


# Archives no unpacker may be given: (test id, members, what the error line names).
HOSTILE_ARCHIVES = [
    ("dotdot-member", [member("./../../escaped")], "./../../escaped"),
    ("absolute-member", [member("/etc/cron.d/evil")], "/etc/cron.d/evil"),
    (
        "hardlink-to-absolute",
        [
            member("./etc/", tarfile.DIRTYPE, b""),
            member("./etc/pw", tarfile.LNKTYPE, link="/etc/shadow"),
        ],
        "/etc/shadow",
    ),
    (
        "hardlink-outside",
        [
            member("./etc/", tarfile.DIRTYPE, b""),
            member("./etc/pw", tarfile.LNKTYPE, link="./../x"),
        ],
        "./../x",
    ),
    (
        "hardlink-to-missing",
        [
            member("./etc/", tarfile.DIRTYPE, b""),
            member("./etc/pw", tarfile.LNKTYPE, link="./nope"),
        ],
        "./etc/pw",
    ),
    (
        "file-through-symlink",
        [member("./etc", tarfile.SYMTYPE, b"", link="/tmp"), member("./etc/cron.d/evil")],
        "./etc/cron.d/evil",
    ),
    (
        "dir-through-symlink",
        [
            member("./usr/", tarfile.DIRTYPE, b""),
            member("./usr/lib", tarfile.SYMTYPE, b"", link="../../.."),
            member("./usr/lib/x/", tarfile.DIRTYPE, b""),
        ],
        "./usr/lib/x",
    ),
]


@pytest.mark.parametrize(
    ("members", "names"),
    [pytest.param(m, n, id=i) for i, m, n in HOSTILE_ARCHIVES],
)
@pytest.mark.parametrize("verb", ["validate", "build"])
def test_hostile_archive_refused(
    site: Path, sentinel: Path, members: list, names: str, verb: str
) -> None:
    deb = hostile_deb(site / "modules/pool", members)
    use_modules(site, "core", "evil")
    proc = assert_refused(site, verb, names=str(deb), sentinel=sentinel)
    assert repr(names) in proc.stderr


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) - 200], id="truncated-deb"),
        pytest.param(lambda data: data[:8] + b"\x00garbage" * 64, id="garbage-deb"),
        pytest.param(
            lambda data: data[: data.index(b"data.tar")] + b"data.tar.gz/    " + b"\xff" * 300,
            id="corrupt-data-member",
        ),
    ],
)
def test_broken_module_deb_is_one_line(site: Path, damage: Callable[[bytes], bytes]) -> None:
    add_evil(site, {"usr/share/evil/a": "a\n" * 500}, {})
    deb = site / "modules/pool" / f"{EVIL}_11.0.0_amd64.deb"
    deb.write_bytes(damage(deb.read_bytes()))
    assert_refused(site, "validate", names=str(deb))


# --- links a module ships: resolved inside the image ----------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("{outside}/secret", id="shadow-absolute-link"),
        pytest.param("../../../../../../../../..{outside}/secret", id="shadow-relative-link"),
        pytest.param("{outside}/link", id="shadow-link-to-link"),
    ],
)
def test_symlinked_etc_shadow_is_not_read(
    site: Path, sentinel: Path, tmp_path: Path, target: str
) -> None:
    # The evil module comes after core: its link replaces core's /etc/shadow in the stage.
    add_evil(site, {}, {"etc/shadow": target.format(outside=sentinel)})
    before = tree_listing(sentinel)
    build_images(site)
    assert_nothing_leaked(site, sentinel, before, tmp_path)
    shadow = unpack(site, tmp_path / "img") / "etc/shadow"
    assert not shadow.is_symlink() and shadow.read_text().startswith(f"root:{HEAD_HASH}:")


def test_symlinked_doc_dir_gets_no_changelogs_outside(
    site: Path, sentinel: Path, tmp_path: Path
) -> None:
    add_evil(site, {}, {"usr/share/doc/qlustar-image": str(sentinel / "dir")})
    before = tree_listing(sentinel)
    build_images(site)
    assert_nothing_leaked(site, sentinel, before, tmp_path)
    root = unpack(site, tmp_path / "img")
    # The link means a path in the image: the changelogs went there, inside the image.
    inside = root / str(sentinel / "dir").lstrip("/") / "evil.contents.changelog.gz"
    assert inside.is_file()


def test_symlinked_package_list_is_not_read(site: Path, sentinel: Path, tmp_path: Path) -> None:
    add_evil(site, {}, {"usr/share/qlustar/modules/evil.packages": str(sentinel / "secret")})
    before = tree_listing(sentinel)
    build_images(site)
    assert_nothing_leaked(site, sentinel, before, tmp_path)


# --- overlays and whiteouts -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "why"),
    [
        pytest.param("/etc/../../outside", "..", id="remove-dotdot"),
        pytest.param("/etc/..", "..", id="remove-trailing-dotdot"),
        pytest.param("etc/passwd", "absolute", id="remove-relative"),
        pytest.param("//etc/passwd", "empty", id="remove-double-slash"),
        pytest.param("/./etc/passwd", "'.'", id="remove-dot"),
        pytest.param("/", "'.'", id="remove-root"),
        pytest.param("/*", "whole image", id="remove-everything"),
    ],
)
def test_remove_line_refused_at_validation(site: Path, line: str, why: str) -> None:
    remove = site / "overlays/demo/remove"
    remove.parent.mkdir(parents=True)
    remove.write_text(f"# whiteouts\n{line}\n")
    proc = assert_refused(site, "validate", names=f"{remove}: line 2:")
    assert why in proc.stderr
    assert_refused(site, "build", names=f"{remove}: line 2:")


def test_overlay_special_file_refused(site: Path) -> None:
    fifo = site / "overlays/common/copy/etc/fifo"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    assert_refused(site, "validate", names=str(fifo))


def test_remove_through_overlay_symlink_stays_inside(
    site: Path, sentinel: Path, tmp_path: Path
) -> None:
    # common makes /usr/share/evil a link to the sentinel; the image layer removes below it.
    common = site / "overlays/common/copy/usr/share"
    common.mkdir(parents=True)
    os.symlink(sentinel / "dir", common / "evil")
    add_evil(site, {}, {"etc/evil-dir": str(sentinel)})
    (site / "overlays/demo").mkdir(parents=True)
    (site / "overlays/demo/remove").write_text(
        "/usr/share/evil/file\n/usr/share/evil/*\n/etc/evil-dir/secret\n/etc/evil-dir/*/file\n"
    )
    before = tree_listing(sentinel)
    build_images(site)
    assert_nothing_leaked(site, sentinel, before, tmp_path)
    root = unpack(site, tmp_path / "img")
    assert os.readlink(root / "usr/share/evil") == str(sentinel / "dir")


def test_whiteouts_remove_links_themselves(site: Path, sentinel: Path, tmp_path: Path) -> None:
    """Positive: a dangling link a module ships is removed; a link to a directory outside is
    removed as a link, its target untouched; a glob through an in-image link works as in the
    image (/lib -> usr/lib)."""
    add_evil(
        site,
        {"usr/lib/evil/a": "a\n", "usr/lib/evil/keep": "k\n"},
        {
            "etc/dangling": "/nonexistent/target",
            "etc/outside": str(sentinel / "dir"),
            "lib": "usr/lib",
        },
    )
    (site / "overlays/demo").mkdir(parents=True)
    (site / "overlays/demo/remove").write_text("/etc/dangling\n/etc/outside\n/lib/evil/a\n")
    before = tree_listing(sentinel)
    build_images(site)
    assert_nothing_leaked(site, sentinel, before, tmp_path)
    root = unpack(site, tmp_path / "img")
    assert not os.path.lexists(root / "etc/dangling")
    assert not os.path.lexists(root / "etc/outside")
    assert not (root / "usr/lib/evil/a").exists()
    assert (root / "usr/lib/evil/keep").read_text() == "k\n"


def test_overlay_hard_links_are_kept(site: Path, tmp_path: Path) -> None:
    """Positive: files hard-linked in an overlay are one inode in the image."""
    add_evil(site, {}, {})
    copy = site / "overlays/common/copy/usr/bin"
    copy.mkdir(parents=True)
    (copy / "tool").write_text("#!/bin/sh\necho tool\n")
    os.chmod(copy / "tool", 0o755)
    os.link(copy / "tool", copy / "tool-alias")
    (copy / "other").write_text("other\n")
    build_images(site)
    listing = subprocess.run(
        ["unsquashfs", "-lls", "-n", str(image_of(site))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    root = unpack(site, tmp_path / "img")
    a, b = (root / "usr/bin/tool").stat(), (root / "usr/bin/tool-alias").stat()
    assert (a.st_ino, a.st_nlink) == (b.st_ino, 2), listing
    assert (root / "usr/bin/other").stat().st_nlink == 1


# --- Root FS trees --------------------------------------------------------------------------


def test_rootfs_symlink_dir_is_not_read_through(site: Path, sentinel: Path) -> None:
    add_evil(site, {}, {})
    tweaks = site / "rootfs/tweaks"
    os.symlink(sentinel / "dir", tweaks / "etc/outside")
    os.symlink(sentinel / "secret", tweaks / "etc/secret-link")
    before = tree_listing(sentinel)
    proc = qlimage("-C", str(site), "build", "bundle")
    assert tree_listing(sentinel) == before
    assert_no_sentinel_text(site / "bootfiles")
    bundles = list((site / "bootfiles/qlustar").rglob("bundle.json"))
    assert bundles, proc.stdout
    text = b"".join(p.read_bytes() for p in bundles)
    assert str(sentinel / "dir").encode() in text  # the link itself travels, as a link


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda top, s: os.mkfifo(top / "etc/fifo"), id="rootfs-fifo"),
        pytest.param(
            lambda top, s: os.mknod(top / "etc/disk", 0o600 | stat.S_IFBLK, os.makedev(8, 0)),
            id="rootfs-device",
        ),
        pytest.param(
            lambda top, s: os.symlink(s / "dir", top.with_name("linked")), id="rootfs-top-link"
        ),
    ],
)
def test_rootfs_special_entries_refused(
    site: Path, sentinel: Path, make: Callable[[Path, Path], None]
) -> None:
    top = site / "rootfs/tweaks"
    make(top, sentinel)
    if (site / "rootfs/linked").is_symlink():
        nodes = site / "nodes.d/cluster.toml"
        nodes.write_text(nodes.read_text().replace('rootfs = ["tweaks"]', 'rootfs = ["linked"]'))
        names = str(site / "rootfs/linked")
    else:
        names = str(next(p for p in top.rglob("*") if p.name in ("fifo", "disk")))
    assert_refused(site, "validate", names=names, sentinel=sentinel)


def test_rootfs_private_file_warns_and_builds(site: Path) -> None:
    add_evil(site, {}, {})
    key = site / "rootfs/tweaks/etc/qlustar/key"
    key.write_text("private\n")
    os.chmod(key, 0o600)
    proc = qlimage("-C", str(site), "build", "bundle")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("qlimage: warning:")]
    assert any(str(key) in line and "0600" in line for line in warnings), proc.stderr
    assert len([w for w in warnings if str(key) in w]) == 1  # two hosts, one warning


# --- served mtimes --------------------------------------------------------------------------


def test_served_mtimes_are_clamped(built_site: Path) -> None:
    """Every served file, directory and link has an mtime at most source_date_epoch."""
    bootfiles = built_site / "bootfiles"
    late = []
    for top in ("tftpboot", "pxelinux.cfg", "qlustar"):
        for path in [bootfiles / top, *(bootfiles / top).rglob("*")]:
            if path.lstat().st_mtime > EPOCH:
                late.append(f"{path}: {time.ctime(path.lstat().st_mtime)}")
    assert not late, "\n".join(late)
