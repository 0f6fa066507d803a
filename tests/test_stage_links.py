"""Staging links module files from the unpacked cache instead of copying them (issue 13): the
image is byte for byte what a copied stage gives, nothing written into the stage reaches the
cache, the previous stage is deleted in the background yet never left behind, and a stage on
another filesystem than the cache is copied instead."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from qlimage import contract
from qlimage.atomic import TMP_PREFIX
from qlimage.image import squashfs
from qlimage.layout import Layout
from qlimage.site import load_site
from qlimage.trees import manifest, walk

from helpers import QLIMAGE, REPO, qlimage

pytestmark = [pytest.mark.tools]


def restage(site: Path) -> None:
    """Stage and pack the image again from the site's inputs (the clone's stage is a copy)."""
    qlimage("-C", str(site), "doit", "forget", "stage:demo", "squashfs:demo")
    qlimage("-C", str(site), "build", "--quiet")


def inodes(tree: Path) -> dict[tuple[int, int], Path]:
    return {
        (st.st_dev, st.st_ino): p for p in walk(tree) if stat.S_ISREG((st := p.lstat()).st_mode)
    }


def cache_trees(site: Path) -> list[Path]:
    return sorted(p for p in Layout(load_site(site)).module_cache.iterdir() if p.is_dir())


def add_overlay(site: Path) -> None:
    """An overlay replacing a module file (with another mode), removing one and adding a pair
    of files hard-linked to each other."""
    copy = site / "overlays/common/copy"
    (copy / "etc").mkdir(parents=True)
    (copy / "etc/netconfig").write_text("replaced by the overlay\n")
    os.chmod(copy / "etc/netconfig", 0o600)
    (copy / "usr/bin").mkdir(parents=True)
    (copy / "usr/bin/tool").write_text("#!/bin/sh\necho tool\n")
    os.chmod(copy / "usr/bin/tool", 0o755)
    os.link(copy / "usr/bin/tool", copy / "usr/bin/tool-alias")
    (site / "overlays/common/remove").write_text("/etc/inittab\n")


def test_linked_stage_packs_as_a_copy_would(built_copy: Path, tmp_path: Path) -> None:
    add_overlay(built_copy)
    restage(built_copy)
    site = load_site(built_copy)
    layout = Layout(site)
    staged = layout.stage("demo")
    cached = {key for tree in cache_trees(built_copy) for key in inodes(tree)}
    linked = [p for key, p in inodes(staged).items() if key in cached]
    assert len(linked) > 100, "the stage shares no inode with the module cache"
    assert all(p.stat().st_nlink >= 2 for p in linked)

    # A copy keeps the links among the stage's own files and drops those into the cache.
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(staged), str(copy)], check=True)
    assert (copy / "usr/bin/tool").stat().st_ino == (copy / "usr/bin/tool-alias").stat().st_ino
    squashfs.pack_image(site, copy, tmp_path / "copy.img")
    squashfs.pack_image(site, staged, tmp_path / "linked.img")
    published = layout.image_root("demo") / contract.CURRENT / contract.image_file("demo")
    assert (tmp_path / "linked.img").read_bytes() == (tmp_path / "copy.img").read_bytes()
    assert published.read_bytes() == (tmp_path / "copy.img").read_bytes()

    listing = subprocess.run(
        ["unsquashfs", "-lls", "-n", str(published)], capture_output=True, text=True, check=True
    ).stdout
    unpacked = tmp_path / "unpacked"
    subprocess.run(["unsquashfs", "-n", "-d", str(unpacked), str(published)], check=True)
    assert (unpacked / "usr/bin/tool").stat().st_nlink == 2, listing
    for p in walk(unpacked):  # the image's links are the copy's: none into the cache
        st = p.lstat()
        if stat.S_ISREG(st.st_mode):
            assert st.st_nlink == (copy / p.relative_to(unpacked)).stat().st_nlink, listing


def test_nothing_written_into_the_stage_reaches_the_cache(built_copy: Path) -> None:
    trees = cache_trees(built_copy)
    before = {tree: manifest(tree) for tree in trees}
    add_overlay(built_copy)
    restage(built_copy)
    assert {tree: manifest(tree) for tree in trees} == before

    staged = Layout(load_site(built_copy)).stage("demo")
    cached = {key for tree in trees for key in inodes(tree)}
    for rel in ("etc/netconfig", "etc/shadow", "usr/bin/tool"):  # overlay, root hash, new file
        st = (staged / rel).lstat()
        assert (st.st_dev, st.st_ino) not in cached, rel
    assert stat.S_IMODE((staged / "etc/netconfig").lstat().st_mode) == 0o600
    assert not (staged / "etc/inittab").exists()
    assert any((tree / "etc/inittab").exists() for tree in trees)


def test_the_previous_stage_is_gone_when_the_build_ends(built_copy: Path) -> None:
    layout = Layout(load_site(built_copy))
    # What a build killed while deleting the previous stage leaves behind.
    killed = layout.stage_dir / f"{TMP_PREFIX}demo.old.killed/demo/etc"
    killed.mkdir(parents=True)
    (killed / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    old = layout.stage("demo").stat().st_ino
    restage(built_copy)
    assert layout.stage("demo").stat().st_ino != old
    assert [p.name for p in layout.stage_dir.iterdir() if p.name.startswith(TMP_PREFIX)] == []


def test_a_stage_on_another_filesystem_is_copied(built_copy: Path) -> None:
    """bootfiles/stage on a tmpfs of its own (a mount namespace of this test): no hard link
    can reach the cache, so the module trees are copied, and the image has the same bytes."""
    layout = Layout(load_site(built_copy))
    restage(built_copy)  # linked, with the changelogs of a build that has a previous one
    current = layout.image_root("demo") / contract.CURRENT
    before = (current / contract.image_file("demo")).read_bytes()
    generation = os.readlink(current)
    qlimage("-C", str(built_copy), "doit", "forget", "stage:demo", "squashfs:demo")
    script = (
        'mount -t tmpfs tmpfs "$0" && "$@" && '
        'test "$(stat -f -c %T "$0")" = tmpfs && test -f "$0/demo/etc/passwd" && '
        'test "$(stat -c %h "$0/demo/etc/passwd")" = 1'
    )
    proc = subprocess.run(
        [
            "unshare", "--mount", "--propagation", "private", "sh", "-c", script,
            str(layout.stage_dir), *QLIMAGE, "-C", str(built_copy), "build", "--quiet",
        ],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert os.readlink(current) == generation
    assert (current / contract.image_file("demo")).read_bytes() == before
