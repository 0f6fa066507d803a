"""`qlimage chroot create|clone|edit|remove|list` as an admin runs it, and the NFS exports file
the graph writes for the chroots: a real chroot built with mmdebstrap, cloned, refused removal
while an image uses it, mounted in a node's union in QEMU, removed; every name and path argument
and every path of a definition that could leave its tree is refused with one line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from qlimage.layout import Layout
from qlimage.serve import exports, vm
from qlimage.site import load_site

from helpers import (
    assert_refused,
    check_golden,
    chroot_node,
    free_port,
    make_site,
    nfs_server,
    qlimage,
    tree_listing,
    write,
)

GOLDEN = Path(__file__).resolve().parent / "golden" / "exports"
TASKS = '\n[chroot_tasks.tools]\npackages = ["hello"]\ndescription = "GNU hello"\n'


def with_chroot_settings(root: Path, trees: Path) -> Path:
    """The site's chroot trees outside the site (the no-op check walks the site) and a task."""
    site_toml = root / "site.toml"
    site_toml.write_text(
        site_toml.read_text() + f"\n[paths]\nchroot_trees = {json.dumps(str(trees))}\n" + TASKS
    )
    return root


@pytest.fixture
def site(site_factory: Callable[..., Path], tmp_path: Path) -> Path:
    """An unbuilt test site with one hand-made chroot `base` (its tree: a directory)."""
    root = with_chroot_settings(site_factory(), tmp_path / "trees")
    write(root / "chroots/base/chroot.toml", 'description = "hand made"\nflavor = "bookworm"\n')
    (tmp_path / "trees/base/usr/bin").mkdir(parents=True)
    return root


def chroot(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return qlimage("-C", str(root), "chroot", *args, check=check)


# --- the exports file ---------------------------------------------------------------------------

EXPORTS_CHROOTS = {
    # default path: [paths] chroot_trees (its default, /srv/qlustar/chroots) / name
    "hpc": 'description = "compilers"\nflavor = "bookworm"\nversion = "13.0"\n',
    # a tree the admin keeps in a subdirectory, served under another NFSv4 path
    "legacy": 'path = "/srv/qlustar/chroots/old/legacy"\nexport = "/legacy"\n',
    # served by another NFS server: that server exports it, not the head
    "remote": 'server = "10.0.2.99"\nexport = "/srv/remote"\n',
}


def exports_site(root: Path) -> Path:
    make_site(root)  # one chroot, hpc, with an explicit export
    for name, text in EXPORTS_CHROOTS.items():
        write(root / "chroots" / name / "chroot.toml", text)
    return root


def test_exports_lists_the_heads_chroots_with_stable_fsids(tmp_path: Path) -> None:
    site = load_site(exports_site(tmp_path / "site"))
    text = exports.render(site)
    check_golden(GOLDEN, {"qlustar-chroots.exports": text})
    assert "remote" not in text
    # Adding a chroot changes no other line: a node's NFS file handles stay valid.
    write(tmp_path / "site/chroots/aaa/chroot.toml", 'description = "first by name"\n')
    again = exports.render(load_site(tmp_path / "site"))
    assert set(text.splitlines()) < set(again.splitlines())
    assert len({line.rsplit("fsid=", 1)[-1] for line in again.splitlines()[2:]}) == 3


def test_exportfs_reads_the_exports_file(tmp_path: Path) -> None:
    """nfs-kernel-server's exportfs parses the file as the head's /etc/exports.d part and
    exports each tree with our options (it needs no running server): in a private mount
    namespace whose /etc is an overlay and whose /var/lib/nfs is ours, nothing of the host's
    changes."""
    root = with_chroot_settings(exports_site(tmp_path / "site"), tmp_path / "trees")
    for name in ("hpc", "legacy"):  # trees exportfs can stat
        (tmp_path / "trees" / name).mkdir(parents=True)
        write(root / "chroots" / name / "chroot.toml", f'path = "{tmp_path}/trees/{name}"\n')
    text = exports.render(load_site(root))
    assert text.count("\n/") == 2
    part = tmp_path / "part"
    part.write_text(text)
    etab = exportfs(tmp_path, part)
    for line in text.splitlines()[2:]:
        path, rest = line.split(" ", 1)
        fsid = rest.rsplit("fsid=", 1)[1].rstrip(")")
        match = [e for e in etab.splitlines() if e.startswith(f"{path}\t10.0.2.0/24(")]
        assert len(match) == 1, etab
        options = match[0].split("(", 1)[1].rstrip(")").split(",")
        for option in ("ro", "no_root_squash", "no_subtree_check", f"fsid={fsid}"):
            assert option in options, match[0]
    assert len(etab.splitlines()) == 2, etab
    # The check can fail: an option exportfs does not know is refused.
    part.write_text(text.replace("no_subtree_check", "no_such_option"))
    with pytest.raises(AssertionError, match="unknown keyword"):
        exportfs(tmp_path, part)


EXPORTFS = """set -e
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$1/up,workdir=$1/work" /etc
mkdir -p /etc/exports.d
: > /etc/exports
cp "$2" /etc/exports.d/qlustar-chroots.exports
mount --bind "$1/state" /var/lib/nfs
exportfs -ra
cat /var/lib/nfs/etab
"""


def exportfs(tmp_path: Path, part: Path) -> str:
    """exportfs -ra on `part` as /etc/exports.d/qlustar-chroots.exports; the etab it writes."""
    work = tmp_path / "exportfs"
    shutil.rmtree(work, ignore_errors=True)
    for d in ("up", "work", "state"):
        (work / d).mkdir(parents=True)
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", EXPORTFS, "sh", work, part],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# --- refused arguments: names and paths -----------------------------------------------------------

BAD_NAMES = ["../evil", "/etc/passwd", "a/b", ".hidden", "Upper", "a\nb", "x" * 65]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_every_name_argument_is_checked(site: Path, sentinel: Path, bad: str) -> None:
    trees = site.parent / "trees"
    before = tree_listing(trees)
    for args, names in (
        (("create", bad, "--no-build"), "chroot name"),
        (("clone", bad, "copy", "--no-build"), "chroot name"),
        (("clone", "base", bad, "--no-build"), "new chroot name"),
        (("edit", bad, "--description", "d", "--no-build"), "chroot name"),
        (("remove", bad, "--yes", "--no-build"), "chroot name"),
        (("create", "fine", "--task", bad, "--no-build"), "--task"),
    ):
        assert_refused(site, "chroot", *args, names=names, sentinel=sentinel)
    assert tree_listing(trees) == before
    assert sorted(p.name for p in (site / "chroots").iterdir()) == ["base"]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--flavor", "../bookworm"),
        ("--flavor", "Bookworm"),
        ("--version", "13"),
        ("--version", "13.0/../x"),
        ("--server", "10.0.2"),
        ("--server", "head.example.org"),
        ("--description", "two\nlines"),
        ("--export", "relative/path"),
        ("--export", "/with space"),
        ("--port", "0"),
        ("--task", "nosuch"),
    ],
)
def test_create_refuses_bad_options_before_building(site: Path, option: str, value: str) -> None:
    proc = assert_refused(
        site, "chroot", "create", "new", option, value, "--no-build", names=option
    )
    assert "mmdebstrap" not in proc.stderr
    assert not (site / "chroots/new").exists()
    assert sorted(os.listdir(site.parent / "trees")) == ["base"]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('path = "../outside"\n', ".path"),
        ('path = "trees/../../outside"\n', ".path"),
        ('path = ".."\n', ".path"),
        ('path = "/srv/with space"\n', ".path"),
        ('path = "/srv/x#comment"\n', ".path"),
        ('path = "/etc"\n', ".path"),  # outside chroot_trees: the head would export it
        ('path = "."\n', ".path"),  # the site itself, with its secrets
        ('path = "/"\n', ".path"),
        ('export = "relative"\n', ".export"),
        ('version = "13"\n', ".version"),
        ('tasks = ["nosuch"]\n', ".tasks"),
        ('tasks = ["../tools"]\n', ".tasks"),
    ],
)
def test_bad_definitions_are_refused(site: Path, sentinel: Path, text: str, field: str) -> None:
    write(site / "chroots/bad/chroot.toml", text)
    proc = assert_refused(site, "validate", names="chroots/bad/chroot.toml", sentinel=sentinel)
    assert field in proc.stderr


@pytest.mark.parametrize(
    "text",
    [
        '\n[paths]\nchroot_trees = "/srv/with space"\n',
        '\n[chroot_tasks.bad]\npackages = ["Not A Package"]\n',
        "\n[chroot_tasks.empty]\npackages = []\n",
        '\n[chroot_tasks."../x"]\npackages = ["hello"]\n',
    ],
)
def test_bad_site_settings_are_refused(site_factory: Callable[..., Path], text: str) -> None:
    root = site_factory()
    (root / "site.toml").write_text((root / "site.toml").read_text() + text)
    assert_refused(root, "validate", names="site.toml")


def test_links_in_place_of_trees_or_definitions_are_never_followed(
    site: Path, sentinel: Path, tmp_path: Path
) -> None:
    # A definition directory that is a link out of the site: never deleted through.
    write(sentinel / "dir/chroot.toml", 'description = "outside"\n')
    os.symlink(sentinel / "dir", site / "chroots/evil")
    assert_refused(site, "chroot", "remove", "evil", "--yes", names="evil", sentinel=sentinel)
    os.unlink(site / "chroots/evil")
    # A tree below chroot_trees that is a link out: never exported (nor anything else).
    write(site / "chroots/out/chroot.toml", 'description = "link out"\n')
    os.symlink(sentinel / "dir", tmp_path / "trees/out")
    assert_refused(site, "validate", names="chroots/out/chroot.toml", sentinel=sentinel)
    os.unlink(tmp_path / "trees/out")
    os.unlink(site / "chroots/out/chroot.toml")
    # A managed tree that is a link: neither removed through nor copied from.
    base_tree = tmp_path / "trees/base"
    os.rmdir(base_tree / "usr/bin")
    os.rmdir(base_tree / "usr")
    os.rmdir(base_tree)
    os.symlink(sentinel / "dir", base_tree)
    assert_refused(site, "chroot", "remove", "base", "--yes", names="base", sentinel=sentinel)
    assert (site / "chroots/base/chroot.toml").exists()
    assert_refused(site, "chroot", "clone", "base", "copy", names="base", sentinel=sentinel)
    assert not (tmp_path / "trees/copy").exists()
    # A link in place of the new tree's place: never built into nor replaced.
    os.unlink(base_tree)
    os.mkdir(base_tree)
    os.symlink(sentinel / "dir", tmp_path / "trees/new")
    assert_refused(site, "chroot", "create", "new", "--no-build", names="exists",
                   sentinel=sentinel)  # fmt: skip


# --- edit, remove, list on a hand-made chroot (no build: --no-build) ---------------------------


def test_edit_changes_only_the_description(site: Path) -> None:
    path = site / "chroots/base/chroot.toml"
    write(path, 'description = "old"\nflavor = "bookworm"\nversion = "12.0"\ntasks = ["tools"]\n')
    before = tomllib.loads(path.read_text())
    out = chroot(site, "edit", "base", "--description", 'new "quoted" été', "--no-build")
    assert "description set" in out.stdout
    assert "to rebuild: qlimage" in out.stdout
    after = tomllib.loads(path.read_text())
    assert after == {**before, "description": 'new "quoted" été'}
    again = chroot(
        site, "edit", "base", "--description", 'new "quoted" été', "--no-build", "--quiet"
    )
    assert "description unchanged" in again.stdout
    assert_refused(site, "chroot", "edit", "base", "--description", "two\nlines", names="--desc")
    assert tomllib.loads(path.read_text()) == after


def test_remove_asks_and_is_refused_while_used(site: Path) -> None:
    images = site / "images.d/demo.toml"
    images.write_text(images.read_text() + 'chroot = "base"\n')
    nodes = site / "nodes.d/cluster.toml"
    nodes.write_text(
        nodes.read_text().replace(
            'image = "demo"\n', 'image = "demo"\noptions = {chroot = "base"}\n'
        )
    )
    listed = chroot(site, "list").stdout
    assert "image demo (images.d/demo.toml)" in listed and "node beo-02" in listed
    proc = assert_refused(site, "chroot", "remove", "base", "--yes", names="chroot 'base'")
    assert "image demo (images.d/demo.toml)" in proc.stderr
    assert "node beo-02 (nodes.d/cluster.toml" in proc.stderr
    images.write_text(images.read_text().replace('chroot = "base"\n', ""))
    nodes.write_text(nodes.read_text().replace('options = {chroot = "base"}\n', ""))
    # No terminal to confirm on: nothing removed.
    proc = assert_refused(site, "chroot", "remove", "base", names="no terminal")
    assert (site / "chroots/base/chroot.toml").exists() and (site.parent / "trees/base").is_dir()
    chroot(site, "remove", "base", "--yes", "--no-build")
    assert not (site / "chroots/base").exists() and not (site.parent / "trees/base").exists()
    assert "no chroot" in chroot(site, "list").stdout


def test_remove_keeps_a_tree_it_does_not_manage(site: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "trees/old/kept"  # below chroot_trees, not chroot_trees/kept
    (elsewhere / "etc").mkdir(parents=True)
    write(site / "chroots/kept/chroot.toml", f"path = {json.dumps(str(elsewhere))}\n")
    out = chroot(site, "remove", "kept", "--yes", "--no-build")
    assert "is not under [paths] chroot_trees: kept" in out.stdout
    assert (elsewhere / "etc").is_dir() and not (site / "chroots/kept").exists()


@pytest.mark.network
def test_a_failed_create_leaves_nothing(site: Path) -> None:
    """mmdebstrap fails on a task package the archive does not have: no tree, no definition,
    nothing aside; the error says which command failed."""
    site_toml = site / "site.toml"
    site_toml.write_text(
        site_toml.read_text() + '\n[chroot_tasks.broken]\npackages = ["qlimage-no-such-pkg"]\n'
    )
    before = sorted(os.listdir(site.parent / "trees"))
    proc = chroot(site, "create", "doomed", "--task", "broken", "--no-build", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    *above, last = proc.stderr.strip().splitlines()
    assert last.startswith("qlimage: chroot doomed: mmdebstrap failed with status "), last
    assert last.endswith("nothing was created"), last
    # mmdebstrap's last lines (its apt and dpkg chatter is not shown) say why, above the error
    assert "E: Unable to locate package qlimage-no-such-pkg" in above, proc.stderr
    assert len(above) <= 12
    assert sorted(os.listdir(site.parent / "trees")) == before
    assert not (site / "chroots/doomed").exists()


# --- the real thing: mmdebstrap, clone, refused removal, a QEMU node, removal -----------------


@pytest.mark.boot
@pytest.mark.network
def test_created_chroot_is_cloned_mounted_by_a_node_and_removed(
    built_copy: Path, tmp_path: Path
) -> None:
    root = with_chroot_settings(built_copy, tmp_path / "trees")
    trees = tmp_path / "trees"
    port = free_port()
    # 1. create: a small real Debian tree plus the `tools` task (GNU hello), then the rebuild.
    out = chroot(
        root, "create", "base", "--task", "tools", "--description", "test base",
        "--port", str(port), "--export", "/chroot",
    )  # fmt: skip
    assert f"created in {trees / 'base'}" in out.stdout
    # Progress as plain lines (stdout is no terminal): installing the essential packages lasts
    # seconds, so its lines show, the last at 100 % of the packages apt announced.
    installed = r"^qlimage: chroot base: 100 % \((\d+)/\1, installing packages\)$"
    assert re.search(installed, out.stdout, re.MULTILINE) and "\r" not in out.stdout, out.stdout
    assert (trees / "base/usr/bin/hello").is_file()
    assert not list((trees / "base/var/cache/apt/archives").glob("*.deb"))  # cached, not served
    assert not [p for p in trees.iterdir() if p.name.startswith(".")]  # nothing left aside
    site = load_site(root)
    assert list((site.paths.cache / "chroots/bookworm_amd64").glob("hello_*.deb"))
    definition = tomllib.loads((root / "chroots/base/chroot.toml").read_text())
    assert definition == {
        "description": "test base", "port": port, "export": "/chroot", "flavor": "bookworm",
        "version": "13.0", "tasks": ["tools"],
    }  # fmt: skip
    written = Layout(site).chroot_exports.read_text()
    assert written == exports.render(site)
    assert f"{trees / 'base'} 10.0.2.0/24(ro,no_root_squash,no_subtree_check,fsid=" in written

    # 2. clone: the same tree (owners, modes, links) under a new name, its own export.
    chroot(root, "clone", "base", "next", "--description", "upgrade test", "--no-build")
    assert tree_listing(trees / "next") == tree_listing(trees / "base")
    cloned = tomllib.loads((root / "chroots/next/chroot.toml").read_text())
    assert cloned["description"] == "upgrade test" and "export" not in cloned
    assert load_site(root).chroots["next"].export == str(trees / "next")

    # 3. refused while the image uses it, naming the image.
    image = root / "images.d/demo.toml"
    saved = image.read_text()
    image.write_text(saved + 'chroot = "base"\n')
    proc = assert_refused(root, "chroot", "remove", "base", "--yes", names="chroot 'base'")
    assert "image demo (images.d/demo.toml)" in proc.stderr
    assert (trees / "base/usr/bin/hello").is_file()
    image.write_text(saved)

    # 4. a node with the chroot in its union runs the chroot's hello (not in the image).
    script = root / "rootfs/tweaks/lib/qlustar/init.d/30-hello"
    write(script, HELLO_SCRIPT, 0o755)
    with nfs_server(trees / "base", tmp_path, port), chroot_node(root, port, "base"):
        result = vm.boot(load_site(root), "chroot-01", timeout=240)
    log = "\n".join(result.console)
    assert result.ok, f"{result.reason}\n{result.tail(60)}"
    assert "qlustar: chroot base mounted from 10.0.2.2:/chroot" in log
    assert "qlustar-test: chroot hello says Hello, world!" in log
    assert "qlustar-test: hello is not in the image" not in log

    # 5. removed once unused: tree, definition and export line go.
    chroot(root, "remove", "base", "--yes")
    assert not (trees / "base").exists() and not (root / "chroots/base").exists()
    written = Layout(load_site(root)).chroot_exports.read_text()
    assert str(trees / "base") not in written and str(trees / "next") in written
    chroot(root, "remove", "next", "--yes", "--no-build")
    assert os.listdir(trees) == []


# Runs on the node after the bundle: the chroot's /usr/bin/hello shows through the union.
HELLO_SCRIPT = """#!/bin/sh
if [ -x /usr/bin/hello ]; then
    echo "qlustar-test: chroot hello says $(/usr/bin/hello)" > /dev/console
else
    echo "qlustar-test: hello is not in the image" > /dev/console
fi
"""
