"""Publishing under faults and stale identities (issue 8, classes 6, 9 and 12, head side).

Kills are injected at exact steps (QLIMAGE_TEST_KILL_AT names a `publish.fault_point`), not by
timing: after each kill the served tree must be consistent (every `current` points at a
verified generation, every node bundle matches its checksum), `rollback` must never pick a
broken generation, and the next build must recover (nothing leaked, history matches
directories).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qlimage.bundle.render import render_bundle
from qlimage.errors import ConfigError, QlimageError
from qlimage.image import publish
from qlimage.layout import Layout
from qlimage.site import load_site

from helpers import REPO, edit, make_site, qlimage, write_site

KILLED = -signal.SIGKILL

# --- image generations, killed at each step of publish -----------------------------------

# A child that publishes one generation of image `x` under the build lock, as a build does.
PUBLISHER = """
import sys
from pathlib import Path
from qlimage.image import publish
from qlimage.trees import file_digest

bootfiles, content, keep = Path(sys.argv[1]), sys.argv[2].encode(), int(sys.argv[3])

def build(gen):
    (gen / "x.img").write_bytes(content * 1000)
    (gen / "x.img.sha256").write_text(file_digest(gen / "x.img") + "  x.img\\n")
    (gen / "modules.json").write_text("{}\\n")
    return [gen / "x.img.sha256", gen / "modules.json"]

with publish.build_lock(bootfiles):
    print(publish.publish(bootfiles / "qlustar/images/x", build, keep))
"""


def publish_child(bootfiles: Path, content: str, keep: int = 2, kill_at: str = "") -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO), QLIMAGE_TEST_KILL_AT=kill_at)
    proc = subprocess.run(
        [sys.executable, "-c", PUBLISHER, str(bootfiles), content, str(keep)],
        env=env,
        capture_output=True,
        text=True,
    )
    return proc.returncode


def gen_dirs(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink()}


def assert_image_served(root: Path) -> None:
    cur = publish.current(root)
    assert cur is not None and publish.is_verified(cur), "current is not a verified generation"


def assert_rollback_safe(root: Path, tmp: Path) -> None:
    """On a copy: rollback either refuses or makes a verified generation current."""
    copy = tmp / "rollback-copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(root, copy, symlinks=True)
    try:
        name = publish.rollback(copy)
    except QlimageError:
        return
    assert publish.is_verified(copy / name)
    assert_image_served(copy)


def assert_recovered(root: Path) -> None:
    assert_image_served(root)
    assert len(set(publish.history(root))) == len(publish.history(root)), "duplicates"
    assert set(publish.history(root)) == gen_dirs(root), "history does not match directories"
    assert not [p for p in root.parent.parent.parent.rglob(".qlimage-tmp*")], "temporaries left"


@pytest.mark.parametrize(
    "point",
    [
        "generation-recorded",
        "generation-renamed",
        "current-switched",
        "prune-unlisted",
        "prune-renamed",
    ],
)
def test_image_publish_killed_at(point: str, tmp_path: Path) -> None:
    bootfiles = tmp_path / "bootfiles"
    root = bootfiles / "qlustar/images/x"
    assert publish_child(bootfiles, "a") == 0
    assert publish_child(bootfiles, "b") == 0
    # The third generation prunes the first (keep 2): every step of publish runs.
    assert publish_child(bootfiles, "c", kill_at=point) == KILLED
    assert (bootfiles / Layout(bootfiles).running.name).exists()  # the marker of a killed build

    assert_image_served(root)
    assert_rollback_safe(root, tmp_path)

    with publish.build_lock(bootfiles):  # recovery runs here, as at the start of a build
        pass
    assert_recovered(root)
    assert publish_child(bootfiles, "d") == 0
    assert_recovered(root)
    assert len(publish.history(root)) == 2


def test_rollback_skips_a_broken_generation_and_refuses_when_none_verifies(
    tmp_path: Path,
) -> None:
    bootfiles = tmp_path / "bootfiles"
    root = bootfiles / "qlustar/images/x"
    a, b, c = (publish.publish(root, make_gen(content), keep=5) for content in (b"a", b"b", b"c"))
    (root / b / "x.img").write_bytes(b"truncat")  # a node would refuse b: checksum mismatch
    assert publish.rollback(root) == a
    assert publish.history(root) == [a]
    assert not (root / b).exists() and not (root / c).exists()
    # Only a half deleted generation before the current one: nothing to roll back to.
    d = publish.publish(root, make_gen(b"d"), keep=5)
    (root / a / "generation").unlink()
    with pytest.raises(QlimageError, match="no previous generation to roll back to"):
        publish.rollback(root)
    assert publish.current_name(root) == d


def make_gen(content: bytes):  # type: ignore[no-untyped-def]
    def build(gen: Path) -> list[Path]:
        (gen / "x.img").write_bytes(content)
        digest = hashlib.sha256(content).hexdigest()
        (gen / "x.img.sha256").write_text(f"{digest}  x.img\n")
        return [gen / "x.img.sha256"]

    return build


def test_recovery_drops_a_half_deleted_generation_from_history(tmp_path: Path) -> None:
    """What the old prune left when killed: a listed directory missing files."""
    bootfiles = tmp_path / "bootfiles"
    root = bootfiles / "qlustar/images/x"
    a, b = (publish.publish(root, make_gen(c), keep=5) for c in (b"a", b"b"))
    (root / a / "x.img.sha256").unlink()
    Layout(bootfiles).running.touch()  # as a killed build leaves it
    with publish.build_lock(bootfiles):
        pass
    assert publish.history(root) == [b]
    assert gen_dirs(root) == {b}


# --- node files: killed while publishing, stale after the inventory changed --------------

PARTIAL = ("bundle", "prune", "pxelinux")  # the tasks that need no image


def node_site(tmp_path: Path) -> Path:
    site = write_site(tmp_path / "site")
    qlimage("-C", str(site), "build", *PARTIAL)
    return site


def build_killed_at(site: Path, point: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), QLIMAGE_TEST_KILL_AT=point)
    proc = subprocess.run(
        [sys.executable, "-m", "qlimage", "-C", str(site), "build", *PARTIAL],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == KILLED, proc.stdout + proc.stderr


def served_nodes(site: Path) -> dict[str, str]:
    """{mac dir: node name} for every served node directory, each checked: bundle and checksum
    agree, the chroot line is there."""
    nodes = Layout(site / "bootfiles").nodes()
    out = {}
    for link in sorted(p for p in nodes.iterdir() if not p.name.startswith(".")):
        assert link.is_symlink()
        bundle = (link / "bundle.json").read_bytes()
        want = (link / "bundle.json.sha256").read_text().split()[0]
        assert hashlib.sha256(bundle).hexdigest() == want, f"{link.name}: bundle != checksum"
        assert (link / "chroot").is_file()
        out[link.name] = json.loads(bundle)["node"]
    return out


def assert_nodes_recovered(site: Path, expected: dict[str, str]) -> None:
    layout = Layout(site / "bootfiles")
    assert served_nodes(site) == expected
    entries = list(layout.nodes().iterdir())
    generations = {p.name for p in entries if p.name.startswith(".")}
    links = {os.readlink(p) for p in entries if p.is_symlink()}
    assert generations == links, "node generations that no link serves"
    assert not list((site / "bootfiles").rglob(".qlimage-tmp*")), "temporaries left"


BOTH = {"52-54-00-12-34-56": "beo-01", "52-54-00-12-34-57": "beo-02"}


@pytest.mark.parametrize(
    "point", ["node-generation-renamed", "node-linked", "node-discard-renamed"]
)
def test_node_publish_killed_at(point: str, tmp_path: Path) -> None:
    site = node_site(tmp_path)
    (site / "rootfs/tweaks/etc/qlustar/secret").write_text("changed\n")  # beo-01's bundle
    build_killed_at(site, point)
    assert served_nodes(site) == BOTH
    qlimage("-C", str(site), "build", *PARTIAL)
    assert_nodes_recovered(site, BOTH)


def remove_beo02(site: Path) -> None:
    text = (site / "nodes.d/cluster.toml").read_text()
    (site / "nodes.d/cluster.toml").write_text(text[: text.rindex("[[hosts]]")])


def test_removed_host_loses_its_files_and_hostid_link(tmp_path: Path) -> None:
    site = node_site(tmp_path)
    hostid = site / "bootfiles/pxelinux.cfg/0A000210"  # 10.0.2.16, beo-02
    assert hostid.is_symlink()
    remove_beo02(site)
    qlimage("-C", str(site), "build", *PARTIAL)
    assert_nodes_recovered(site, {"52-54-00-12-34-56": "beo-01"})
    assert not hostid.is_symlink() and not hostid.exists()
    assert "0A000210" not in (site / "bootfiles/pxelinux.cfg/.hosts").read_text()


def test_removed_host_killed_after_unlinking(tmp_path: Path) -> None:
    site = node_site(tmp_path)
    remove_beo02(site)
    build_killed_at(site, "node-unlinked")
    assert served_nodes(site) == {"52-54-00-12-34-56": "beo-01"}
    qlimage("-C", str(site), "build", *PARTIAL)
    assert_nodes_recovered(site, {"52-54-00-12-34-56": "beo-01"})


def test_changed_mac_serves_nothing_at_the_old_one(tmp_path: Path) -> None:
    site = node_site(tmp_path)
    edit(site / "nodes.d/cluster.toml", 'mac = "52:54:00:12:34:57"', 'mac = "52:54:00:12:34:99"')
    qlimage("-C", str(site), "build", *PARTIAL)
    assert_nodes_recovered(site, {"52-54-00-12-34-56": "beo-01", "52-54-00-12-34-99": "beo-02"})


def test_node_directory_of_the_old_layout_is_replaced(tmp_path: Path) -> None:
    """A real nodes/<mac>/ directory (before node generations) becomes the link."""
    site = write_site(tmp_path / "site")
    old = Layout(site / "bootfiles").nodes() / "52-54-00-12-34-56"
    old.mkdir(parents=True)
    (old / "bundle.json").write_text("{}")
    qlimage("-C", str(site), "build", *PARTIAL)
    assert old.is_symlink()
    assert_nodes_recovered(site, BOTH)


def test_removed_image_loses_its_generations(tmp_path: Path) -> None:
    """Decision: an image that left images.d loses its generations (they carry its root
    password hash); no pxelinux config names it."""
    site = write_site(tmp_path / "site")
    (site / "images.d/old.toml").write_text((site / "images.d/demo.toml").read_text())
    edit(site / "images.d/old.toml", 'name = "demo"', 'name = "old"')
    qlimage("-C", str(site), "build", *PARTIAL)
    root = Layout(site / "bootfiles").image_root("old")
    publish.publish(root, make_gen(b"old image"), keep=3)
    (site / "images.d/old.toml").unlink()
    qlimage("-C", str(site), "build", *PARTIAL)
    assert not root.exists()
    for config in (site / "bootfiles/pxelinux.cfg").iterdir():
        assert "images/old" not in config.read_text()
    assert not list((site / "bootfiles").rglob(".qlimage-tmp*"))


def test_noop_build_does_not_run_the_prune_task(tmp_path: Path) -> None:
    site = node_site(tmp_path)
    out = qlimage("-C", str(site), "build", *PARTIAL).stdout
    assert "-- prune" in out and ".  prune" not in out


# --- the pool: temporaries of a killed module build ---------------------------------------


@pytest.mark.tools
@pytest.mark.network
def test_module_build_killed_leaves_no_temporary_in_the_pool(tmp_path: Path) -> None:
    site = write_site(tmp_path / "site")
    pool = load_site(site).paths.pool
    build_killed = subprocess.run(
        [sys.executable, "-m", "qlimage", "-C", str(site), "build", "module:core"],
        env=dict(os.environ, PYTHONPATH=str(REPO), QLIMAGE_TEST_KILL_AT="module-unpacked"),
        capture_output=True,
    )
    assert build_killed.returncode == KILLED
    assert [p for p in pool.iterdir() if p.name.startswith(".qlimage-tmp.module.core.")]
    qlimage("-C", str(site), "build", "module:core")
    assert not [p for p in pool.iterdir() if p.name.startswith(".qlimage-tmp")]
    assert [p for p in pool.iterdir() if p.suffix == ".deb"]


# --- the node's host name: the inventory wins ---------------------------------------------


def test_rootfs_tree_may_not_replace_etc_hostname(tmp_path: Path) -> None:
    root = make_site(tmp_path / "site")
    (root / "rootfs/base/etc/hostname").write_text("shared-name\n")
    site = load_site(root)
    with pytest.raises(ConfigError, match=r"rootfs/base/etc/hostname: host beo-01: a Root FS"):
        render_bundle(site, site.host("beo-01"))
    # Hosts without that tree still render, with their own name.
    bundle = render_bundle(site, site.host("beo-02"))
    hostname = next(f for f in bundle.files if f.path == "/etc/hostname")
    assert hostname.content == b"beo-02\n"
