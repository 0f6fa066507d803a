"""The change matrix: each change rebuilds exactly the outputs whose inputs changed.

One site with three images is built once; each test changes one input and checks which tasks
the next build executes (doit prints '.  task' for those it runs).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from qlimage.pool.debpack import build_deb

from helpers import qlimage, write_site

pytestmark = [pytest.mark.tools, pytest.mark.network]

IMAGES = {
    "alpha": 'name = "alpha"\nflavor = "bookworm"\nversion = "11"\nmodules = ["core"]\n',
    "beta": 'name = "beta"\nflavor = "bookworm"\nversion = "11"\nmodules = ["core", "extra"]\n',
    "pinned": 'name = "pinned"\nflavor = "bookworm"\nversion = "11.0.0"\n'
    'modules = ["core", "extra"]\n',
}


def module_deb(pool: Path, module: str, version: str, files: dict[str, str]) -> Path:
    tree = pool.parent / f"tree-{module}-{version}"
    for rel, text in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    package = f"qlustar-module-{module}-bookworm"
    return build_deb(
        tree,
        {
            "Package": package,
            "Version": version,
            "Architecture": "amd64",
            "Maintainer": "t <t@example.org>",
            "Description": f"test module {module}",
        },
        pool / f"{package}_{version}_amd64.deb",
        source_date_epoch=1700000000,
    )


def executed(out: str) -> set[str]:
    return set(re.findall(r"^\.  (\S+)", out, re.M))


def build(root: Path) -> set[str]:
    return executed(qlimage("-C", str(root), "build").stdout)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_site(tmp_path_factory.mktemp("matrix") / "site")
    for name, text in IMAGES.items():
        (root / "images.d" / f"{name}.toml").write_text(text)
    (root / "images.d/demo.toml").unlink()
    with (root / "site.toml").open("a") as f:
        f.write('[bootconfigs.demo]\nimage = "alpha"\n')
    text = (root / "site.toml").read_text().replace('image = "demo"', 'image = "alpha"')
    (root / "site.toml").write_text(text)
    nodes = (root / "nodes.d/cluster.toml").read_text().replace('image = "demo"', 'image = "beta"')
    (root / "nodes.d/cluster.toml").write_text(nodes)
    pool = root / "modules/pool"
    pool.mkdir(parents=True)
    # An old core the pinned image resolves to, and the extra module (no network needed).
    module_deb(pool, "core", "11.0.0", {"sbin/init.qlustar": "#!/bin/sh\n"})
    module_deb(pool, "extra", "11.0.0", {"usr/share/extra/version": "11.0.0\n"})
    overlay = root / "overlays/common/copy/etc/motd"
    overlay.parent.mkdir(parents=True)
    overlay.write_text("welcome\n")
    (root / "overlays/beta/copy/etc").mkdir(parents=True)
    (root / "overlays/beta/copy/etc/beta").write_text("beta only\n")
    build(root)
    assert build(root) == set(), "a no-op build must execute nothing"
    return root


IMAGE_TASKS = {f"{kind}:{name}" for kind in ("stage", "squashfs") for name in IMAGES}


def image_tasks(*names: str) -> set[str]:
    return {f"{kind}:{name}" for kind in ("stage", "squashfs") for name in names}


@pytest.mark.parametrize(
    "change",
    ["edit", "add", "delete", "chmod"],
)
def test_common_overlay_change_rebuilds_every_image(site: Path, change: str) -> None:
    copy = site / "overlays/common/copy"
    if change == "edit":
        (copy / "etc/motd").write_text("welcome back\n")
    elif change == "add":
        (copy / "etc/issue").write_text("qlustar\n")
    elif change == "delete":
        (copy / "etc/issue").unlink()
    else:
        os.chmod(copy / "etc/motd", 0o600)
    assert build(site) == IMAGE_TASKS


@pytest.mark.parametrize("change", ["edit", "add", "delete", "chmod"])
def test_image_overlay_change_rebuilds_that_image(site: Path, change: str) -> None:
    copy = site / "overlays/beta/copy"
    if change == "edit":
        (copy / "etc/beta").write_text("beta changed\n")
    elif change == "add":
        (copy / "etc/beta2").write_text("more\n")
    elif change == "delete":
        (copy / "etc/beta2").unlink()
    else:
        os.chmod(copy / "etc/beta", 0o640)
    assert build(site) == image_tasks("beta")


def test_whiteout_change_rebuilds_that_image(site: Path) -> None:
    (site / "overlays/beta/remove").write_text("/usr/share/extra/version\n")
    assert build(site) == image_tasks("beta")


def test_new_module_version_moves_only_images_resolving_to_it(site: Path) -> None:
    before = (site / "bootfiles/qlustar/images/pinned/current").readlink()
    module_deb(site / "modules/pool", "extra", "11.0.1", {"usr/share/extra/version": "11.0.1\n"})
    assert build(site) == image_tasks("beta")  # alpha has no extra; pinned stays at 11.0.0
    assert (site / "bootfiles/qlustar/images/pinned/current").readlink() == before


def test_image_definition_edit_rebuilds_that_image(site: Path) -> None:
    path = site / "images.d/alpha.toml"
    path.write_text(path.read_text() + 'description = "now with a description"\n')
    # Only the description changed: nothing in the image depends on it.
    assert build(site) == set()
    path.write_text(path.read_text().replace('modules = ["core"]', 'modules = ["core", "extra"]'))
    assert build(site) == image_tasks("alpha")


def test_node_added_rebuilds_pxelinux_links_and_its_bundle_only(site: Path) -> None:
    nodes = site / "nodes.d/cluster.toml"
    nodes.write_text(
        nodes.read_text() + '\n[[hosts]]\nname = "beo-09"\nmac = "52:54:00:00:00:09"\n'
        'image = "beta"\nnetworks.boot = "10.0.2.99"\n'
    )
    # The head's DHCP and HTTP configs name every node; prune's input is the set of nodes; the
    # GRUB and iPXE per-host configs, like pxelinux's links, gain the new node's. The SSH host
    # files name every node too: served once with their sums, in no bundle (test_sshfiles.py).
    assert build(site) == {
        "pxelinux:links",
        "grub:configs",
        "ipxe",
        "bundle:beo-09",
        "headconfig",
        "prune",
        "ssh:ssh_known_hosts",
        "ssh:shosts.equiv",
        "ssh:SHA256SUMS",
    }


def test_node_options_change_rebuilds_that_nodes_bundle_only(site: Path) -> None:
    nodes = site / "nodes.d/cluster.toml"
    nodes.write_text(nodes.read_text() + "options.opensm = true\n")  # appended to beo-09
    assert build(site) == {"bundle:beo-09"}
    secret = site / "rootfs/tweaks/etc/qlustar/secret"
    secret.write_text("changed\n")  # beo-01 uses the tweaks config (group rack1), beo-02 not
    assert build(site) == {"bundle:beo-01"}


def test_node_renamed_and_back_serves_its_own_name(site: Path) -> None:
    # bundle:beo-09 comes back with the values it saved before the rename: its inputs match,
    # but the link serves what bundle:tmp-09 wrote, so it must run again.
    nodes = site / "nodes.d/cluster.toml"
    before = nodes.read_text()
    nodes.write_text(before.replace('name = "beo-09"', 'name = "tmp-09"'))
    assert "bundle:tmp-09" in build(site)
    nodes.write_text(before)
    assert "bundle:beo-09" in build(site)
    served = site / "bootfiles/qlustar/nodes/52-54-00-00-00-09/bundle.json"
    assert json.loads(served.read_text())["node"] == "beo-09"
    assert build(site) == set()


def served_files(site: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and link below bootfiles/ but the build's own state: (inode, mtime, ctime)
    show which the build rewrote (a rename-in gives a new inode)."""
    out = {}
    skipped = ("manifests", "stage", "cache", "kernel", "head/run")
    for path in (site / "bootfiles").rglob("*"):
        rel = str(path.relative_to(site / "bootfiles"))
        if rel.startswith((*skipped, ".")) or (path.is_dir() and not path.is_symlink()):
            continue
        st = path.lstat()
        out[rel] = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    return out


def rewritten(site: Path, edit: Callable[[], object]) -> set[str]:
    """The served files a build after `edit` writes, removes or adds; the build runs `bundle`
    for exactly one node (the bundle line names it)."""
    before = served_files(site)
    edit()
    out = qlimage("-C", str(site), "build").stdout
    after = served_files(site)
    changed = {f for f in before.keys() & after.keys() if before[f] != after[f]}
    node_lines = re.findall(r"^\.  bundle:(\S+)", out, re.M)
    assert len(node_lines) == 1, out
    return changed | (before.keys() ^ after.keys())


def node_files(mac: str, changes: set[str]) -> set[str]:
    """The node's served link and the files of its new generation (and of the one it left)."""
    nodes = "qlustar/nodes/"
    mine = {f for f in changes if f.startswith((f"{nodes}{mac}", f"{nodes}.{mac}."))}
    assert f"{nodes}{mac}" in mine
    assert {f.rsplit("/", 1)[-1] for f in mine - {f"{nodes}{mac}"}} <= {
        "bundle.json",
        "bundle.json.sha256",
        "chroot",
    }
    return mine


# What names a node: its DHCP entry (dnsmasq), nginx's allowed clients (by name and address),
# ql-mcastd's (by address), the SSH host files (known_hosts by name only, for a node without
# keys; shosts.equiv by name and address) and their sums; the pxelinux HOSTID link and index.
CLUSTER = "qlustar/cluster/"
BY_NAME = {"head/dnsmasq.conf", "head/nginx.conf", f"{CLUSTER}ssh_known_hosts"}
BY_ADDRESS = {"head/dnsmasq.conf", "head/nginx.conf", "head/mcastd.json"}
BY_BOTH = {f"{CLUSTER}shosts.equiv", f"{CLUSTER}SHA256SUMS"}


def test_one_node_edited_rewrites_exactly_its_files(site: Path) -> None:
    """Issue 13's goal 2: renaming, readdressing or reconfiguring one node rewrites that node's
    served files and the files that name it, and nothing else (no other node's, no GRUB or
    iPXE config of any host, no image)."""
    assert build(site) == set()
    nodes = site / "nodes.d/cluster.toml"
    mac = "52-54-00-00-00-09"  # beo-09, added by an earlier test
    text = nodes.read_text()

    def rename() -> None:
        nodes.write_text(text.replace('name = "beo-09"', 'name = "ren-09"'))

    changes = rewritten(site, rename)
    assert changes - node_files(mac, changes) == BY_NAME | BY_BOTH

    def readdress() -> None:
        nodes.write_text(nodes.read_text().replace('"10.0.2.99"', '"10.0.2.98"'))

    changes = rewritten(site, readdress)
    pxelinux = {"pxelinux.cfg/0A000263", "pxelinux.cfg/0A000262", "pxelinux.cfg/.hosts"}
    assert changes - node_files(mac, changes) == BY_ADDRESS | BY_BOTH | pxelinux

    def reconfigure() -> None:
        nodes.write_text(nodes.read_text().replace("options.opensm = true", ""))

    changes = rewritten(site, reconfigure)
    assert changes - node_files(mac, changes) == set()

    nodes.write_text(text)
    assert "bundle:beo-09" in build(site)


def test_node_whose_served_files_changed_is_published_again(site: Path) -> None:
    """The bundle task's table is not trusted blindly: a link retargeted by hand or a file
    removed from a node's generation makes exactly that node publish again."""
    assert build(site) == set()
    nodes = site / "bootfiles/qlustar/nodes"
    link = nodes / "52-54-00-00-00-09"
    served = os.readlink(link)
    (nodes / served / "bundle.json.sha256").unlink()
    assert build(site) == {"bundle:beo-09"}
    assert (link / "bundle.json.sha256").is_file()
    other = os.readlink(nodes / "52-54-00-12-34-56")  # beo-01's generation
    link.unlink()
    os.symlink(other, link)  # beo-09's MAC now serves beo-01's bundle
    assert build(site) == {"bundle:beo-09"}
    assert json.loads((link / "bundle.json").read_text())["node"] == "beo-09"
    assert build(site) == set()


def test_kernel_package_change_rebuilds_initrd_only(site: Path) -> None:
    text = (site / "site.toml").read_text()
    (site / "site.toml").write_text(text + '\n[kernel]\npackage = "linux-image-6.1.0-50-amd64"\n')
    assert build(site) == {"kernel", "initrd"}


def test_noop_after_all_changes(site: Path) -> None:
    assert build(site) == set()


def test_state_of_the_per_node_tasks_of_older_versions_is_dropped(tmp_path: Path) -> None:
    """Older versions had a doit task per node; doit keeps the state of a task that is gone,
    so a site upgraded at 10,000 nodes would read and write megabytes of it in every build."""
    from qlimage.tasks.graph import read_state, repair_state

    state = tmp_path / ".doit-state.json"
    kept = {"kernel": {"checker:": "md5"}, "bundle": {"_values_:": {}}}
    state.write_text(json.dumps({**kept, "bundle:beo-01": {}, "bundle:beo-02": {}}))
    repair_state(state)
    assert read_state(state) == kept
    before = state.stat()
    repair_state(state)  # nothing left to drop: not written again
    assert state.stat().st_ino == before.st_ino


def test_inventory_layout_edits_publish_at_most_the_node_whose_table_changed(site: Path) -> None:
    """Bundle keys name the bytes of a node's own [[hosts]] table (site/load.py origins): blank
    lines between nodes and a comment above them publish nothing; a comment inside a node's
    table publishes that node again, with the same bundle."""
    assert build(site) == set()
    nodes = site / "nodes.d/cluster.toml"
    text = nodes.read_text()
    nodes.write_text("# the cluster\n" + text.replace("\n[[hosts]]", "\n\n\n[[hosts]]"))
    assert build(site) == set()
    served = site / "bootfiles/qlustar/nodes/52-54-00-12-34-57/bundle.json"
    before = served.read_bytes()
    nodes.write_text(nodes.read_text().replace('name = "beo-02"', 'name = "beo-02"  # spare'))
    assert build(site) == {"bundle:beo-02"}
    assert served.read_bytes() == before
    nodes.write_text(text)
    assert build(site) == {"bundle:beo-02"}
    assert build(site) == set()
