"""The no-op fast path (`qlimage.tasks.stamp`): an untouched site answers "nothing to do"
without starting doit, and every kind of input change doit would see makes it decline, so the
build does the work.

One built site per module: each test first stamps it (a build once its inputs are older than the
stamp's margin), checks the fast path answers, changes one input and builds again.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import qlimage
from qlimage.bundle.publish import GENERATION_FILES
from qlimage.pool.debpack import build_deb
from qlimage.site import load_site
from qlimage.tasks import stamp

from helpers import REPO, clone_built_site
from helpers import qlimage as run_qlimage

pytestmark = [pytest.mark.tools, pytest.mark.network]

NOTHING = "nothing to do"
NODE = "52-54-00-12-34-56"  # beo-01's boot MAC, as its node directory names it


@pytest.fixture(scope="module")
def site(built_site: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return clone_built_site(built_site, tmp_path_factory.mktemp("fast") / "site")


def build(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "qlimage", "-C", str(root), "build"],
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def executed(out: str) -> set[str]:
    return set(re.findall(r"^\.  (\S+)", out, re.M))


def stamped(root: Path) -> None:
    """Build until the site carries a stamp: a build may only stamp inputs older than the
    margin, and a clone's files are all new."""
    for _ in range(3):  # the first build of a clone rebuilds its recipe's .deb in the pool
        time.sleep(stamp.MARGIN_NS / 1e9 + 0.1)
        build(root)
        if (root / "bootfiles/.build-stamp.json").exists():
            break
    assert (root / "bootfiles/.build-stamp.json").exists()
    assert NOTHING in build(root).stdout


def declines(root: Path, **env: str) -> str:
    """The next build's output, which must come from doit, not from the fast path."""
    out = build(root, **env).stdout
    assert NOTHING not in out
    assert re.search(r"^(\.  |-- )\S+", out, re.M), "doit did not run"
    return out


def test_untouched_site_answers_without_doit_jsonschema_or_jinja(site: Path) -> None:
    stamped(site)
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "qlimage", "-C", str(site), "build"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"qlimage: {NOTHING} (no input changed since the last build)"
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()}
    assert not imported & {"doit", "jsonschema", "jinja2"}


def test_version_control_and_tool_caches_are_no_inputs(site: Path) -> None:
    # They exist before the build (a new entry in the site root is a change like any other).
    names = (".git", ".venv", ".ruff_cache")
    for name in names:
        (site / name / "objects").mkdir(parents=True, exist_ok=True)
    stamped(site)
    for name in names:
        (site / name / "objects/new").write_text("a commit, a pip install\n")
        (site / name / "objects/more").mkdir()
    assert NOTHING in build(site).stdout


def test_site_file_change_is_built(site: Path) -> None:
    stamped(site)
    path = site / "site.toml"
    path.write_text(path.read_text().replace('append = "debug"', 'append = "debug quiet"'))
    assert "pxelinux:configs" in executed(declines(site))


def test_node_file_change_is_built(site: Path) -> None:
    stamped(site)
    nodes = site / "nodes.d/cluster.toml"
    nodes.write_text(nodes.read_text() + "options.opensm = true\n")  # appended to beo-02
    assert executed(declines(site)) == {"bundle:beo-02"}


def test_overlay_file_change_is_built(site: Path) -> None:
    stamped(site)
    motd = site / "overlays/common/copy/etc/motd"
    motd.parent.mkdir(parents=True, exist_ok=True)
    motd.write_text("fast path test\n")
    assert {"stage:demo", "squashfs:demo"} <= executed(declines(site))


def test_rootfs_file_change_is_built(site: Path) -> None:
    stamped(site)
    (site / "rootfs/tweaks/etc/qlustar/secret").write_text("changed by the fast path test\n")
    assert executed(declines(site)) == {"bundle:beo-01"}


def test_pool_package_added_is_seen(site: Path) -> None:
    stamped(site)
    tree = site.parent / "extra-tree"
    (tree / "usr/share/extra").mkdir(parents=True)
    (tree / "usr/share/extra/version").write_text("1\n")
    package = "qlustar-module-extra-bookworm"
    build_deb(
        tree,
        {
            "Package": package,
            "Version": "11.0.0",
            "Architecture": "amd64",
            "Maintainer": "t <t@example.org>",
            "Description": "fast path test module",
        },
        site / f"modules/pool/{package}_11.0.0_amd64.deb",
        source_date_epoch=1700000000,
    )
    declines(site)  # no image uses it: doit decides (nothing), not the stamp
    images = site / "images.d/demo.toml"
    images.write_text(images.read_text().replace('["core"]', '["core", "extra"]'))
    assert {"stage:demo", "squashfs:demo"} <= executed(declines(site))


def test_kernel_package_in_the_cache_is_seen(site: Path) -> None:
    """The kernel and initrd tasks read the kernel .deb from the download cache: any change
    there (here only its ctime, so other tests sharing the cache see the same bytes) counts."""
    stamped(site)
    cache = Path(os.environ.get("QLIMAGE_CACHE", Path.home() / ".cache/qlimage"))
    debs = sorted(cache.rglob("linux-image-*.deb"))
    assert debs, f"no kernel package in {cache}"
    st = debs[0].stat()
    os.utime(debs[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    declines(site)


def test_qlimage_code_or_template_change_is_seen(site: Path) -> None:
    """An upgrade of qlimage replaces its files: every one of them counts, templates too (here
    only the ctime changes, so nothing else sees a difference)."""
    stamped(site)
    template = next((Path(qlimage.__file__).parent / "boot/templates").iterdir())
    st = template.stat()
    os.utime(template, ns=(st.st_atime_ns, st.st_mtime_ns))
    declines(site)


@pytest.mark.parametrize(
    "output, task",
    [
        (f"qlustar/nodes/{NODE}/bundle.json", "bundle:beo-01"),
        (f"tftpboot/grub/grub.cfg-01-{NODE}", "grub:configs"),
        (f"tftpboot/ipxe/{NODE}.ipxe", "ipxe"),
        ("pxelinux.cfg/default", "pxelinux:configs"),
        ("head/nginx.conf", "headconfig"),
        ("qlustar/images/demo/current", "squashfs:demo"),
    ],
)
def test_removed_output_is_rebuilt(site: Path, output: str, task: str) -> None:
    stamped(site)
    (site / "bootfiles" / output).unlink()
    assert task in executed(declines(site))
    assert (site / "bootfiles" / output).exists()


def test_source_date_epoch_change_is_seen(site: Path) -> None:
    stamped(site)
    declines(site, SOURCE_DATE_EPOCH="1700000001")


def test_input_changed_during_the_build_leaves_no_stamp(site: Path) -> None:
    """A file edited just before (or while) a build ran may have been read before the edit:
    that build must not stamp, so the next one looks again."""
    stamped(site)
    (site / "rootfs/tweaks/etc/qlustar/secret").write_text("changed again\n")
    build(site)
    assert not (site / "bootfiles/.build-stamp.json").exists()
    declines(site)


def test_other_doit_runs_discard_the_stamp(site: Path) -> None:
    stamped(site)
    run_qlimage("-C", str(site), "build", "-a", "headconfig")
    assert not (site / "bootfiles/.build-stamp.json").exists()


def test_copied_site_does_not_trust_the_stamp_it_carries(site: Path, tmp_path: Path) -> None:
    """The stamp names the paths of the site that wrote it: a copy must look for itself."""
    stamped(site)
    copy = clone_built_site(site, tmp_path / "copy")
    assert (copy / "bootfiles/.build-stamp.json").exists()
    declines(copy)


def edit_beo_02(root: Path) -> None:
    """Set or flip beo-02's opensm option (the last host of the file: appended to it)."""
    nodes = root / "nodes.d/cluster.toml"
    text = nodes.read_text()
    flipped = {"true": "false", "false": "true"}
    match = re.search(r"^options\.opensm = (true|false)\n\Z", text, re.M)
    if match:
        text = text[: match.start()] + f"options.opensm = {flipped[match[1]]}\n"
    else:
        text += "options.opensm = true\n"
    nodes.write_text(text)


def served_generation(root: Path) -> Path:
    link = root / "bootfiles/qlustar/nodes" / NODE
    return link.parent / os.readlink(link)


def test_an_input_edit_trusts_the_outputs_as_stamped(site: Path) -> None:
    """The build after an edit skips its checks of every node directory only when the stamp
    saw the outputs as they are, and only while it is still that stamp under the lock."""
    stamped(site)
    edit_beo_02(site)
    assert not stamp.up_to_date(site)
    stamp.claim(load_site(site))
    assert stamp.outputs_trusted()
    assert not (site / "bootfiles/.build-stamp.json").exists()
    assert executed(declines(site)) == {"bundle:beo-02"}

    stamped(site)
    edit_beo_02(site)
    assert not stamp.up_to_date(site)
    path = site / "bootfiles/.build-stamp.json"
    path.write_bytes(path.read_bytes())  # another build ran and stamped in between
    stamp.claim(load_site(site))
    assert not stamp.outputs_trusted()
    declines(site)


@pytest.mark.parametrize("tamper", ["stray file", "link retargeted"])
def test_changed_outputs_are_not_trusted_after_an_input_edit(site: Path, tamper: str) -> None:
    """A served node changed behind the build's back is published again, also when an input
    changed too (the build after an edit trusts only outputs as stamped)."""
    stamped(site)
    generation = served_generation(site)
    if tamper == "stray file":
        (generation / "stray").write_text("not the build's\n")
    else:
        link = site / "bootfiles/qlustar/nodes" / NODE
        other = next(p for p in link.parent.iterdir() if p.name.startswith(".") and p != generation)
        link.unlink()
        link.symlink_to(other.name)
    edit_beo_02(site)
    assert not stamp.up_to_date(site)
    assert executed(declines(site)) >= {"bundle:beo-01", "bundle:beo-02"}
    assert sorted(os.listdir(served_generation(site))) == GENERATION_FILES


def edited_and_settled(root: Path) -> None:
    """beo-02 edited, its edit older than the stamp's margin (so the build may stamp)."""
    stamped(root)
    edit_beo_02(root)
    time.sleep(stamp.MARGIN_NS / 1e9 + 0.1)


def build_in_process(root: Path) -> None:
    """A build in this process, so that a test may wrap what it calls."""
    from qlimage.cli import main

    with pytest.raises(SystemExit) as end:
        main(["-C", str(root), "build"])
    assert end.value.code == 0


def test_the_stamp_after_an_edit_takes_untouched_nodes_as_seen_before(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build after an edit stamps the node directories it left alone with the keys the
    stamp check saw before the build (not stat'ed again), and stats the ones it wrote."""
    edited_and_settled(site)
    seen: Counter[str] = Counter()
    stat_key, write = stamp.stat_key, stamp.write

    def counted(path: str, *, follow: bool) -> stamp.Key | None:
        seen[path] += 1
        return stat_key(path, follow=follow)

    def write_counting(*args: Any, **kwargs: Any) -> bool:
        monkeypatch.setattr(stamp, "stat_key", counted)
        return write(*args, **kwargs)

    monkeypatch.setattr(stamp, "write", write_counting)
    build_in_process(site)
    monkeypatch.undo()
    assert (site / "bootfiles/.build-stamp.json").exists()
    nodes = site / "bootfiles/qlustar/nodes"
    assert seen[str(nodes / NODE)] == 0  # beo-01: as the check before the build saw it
    assert seen[str(nodes / "52-54-00-12-34-57")] == 1  # beo-02: written, so looked at
    assert NOTHING in build(site).stdout


def test_a_node_changed_while_an_edit_builds_is_not_stamped_as_served(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A served node changed behind the back of a build that trusted the outputs is not
    recorded as the build's: the next build publishes it again."""
    from qlimage.bundle.publish import NodeBundles

    edited_and_settled(site)
    publish = NodeBundles.publish

    def publish_then_tamper(self: NodeBundles) -> None:
        publish(self)
        (served_generation(site) / "stray").write_text("not the build's\n")

    monkeypatch.setattr(NodeBundles, "publish", publish_then_tamper)
    build_in_process(site)
    monkeypatch.undo()
    assert (site / "bootfiles/.build-stamp.json").exists()
    assert "bundle:beo-01" in executed(declines(site))
    assert sorted(os.listdir(served_generation(site))) == GENERATION_FILES


def test_a_trusted_build_takes_the_generations_to_discard_from_its_table(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the outputs as stamped, the old generation of a node published again is the one
    its table entry names: removed, without a listing of nodes/, and nothing else is."""
    from qlimage.bundle import publish

    edited_and_settled(site)
    nodes = site / "bootfiles/qlustar/nodes"
    before = sorted(os.listdir(nodes))

    def no_listing(*args: object) -> object:
        raise AssertionError("nodes/ was listed")

    monkeypatch.setattr(publish, "generations_by_node", no_listing)
    build_in_process(site)
    monkeypatch.undo()
    after = sorted(os.listdir(nodes))
    beo_02 = "52-54-00-12-34-57"
    assert [n for n in after if beo_02 not in n] == [n for n in before if beo_02 not in n]
    assert [n for n in after if n.startswith(f".{beo_02}.")] == [os.readlink(nodes / beo_02)]


def test_the_stamp_stops_looking_at_the_first_input_changed_during_the_build() -> None:
    """An input as new as the build: no stamp, and the walk ends there (after an edit, the
    site's own files come first; the libraries' trees are never walked)."""
    old, new = (1, 2, 3, 100), (1, 2, 3, 200)

    def entries() -> Iterator[tuple[str, stamp.Key | None, stamp.Key | None]]:
        yield "a", old, None
        yield "b", None, new
        raise AssertionError("walked on")

    assert stamp.settled_entries(entries(), 200) is None
    assert stamp.settled_entries(iter([("a", old, old)]), 200) == [("a", old, old)]


def test_the_pxelinux_index_edited_in_place_withdraws_the_trust(site: Path) -> None:
    """The HOSTID index says what each link is when the outputs are trusted: written in
    place (no directory changes), it is keyed by the stamp itself, as the bundle table is."""
    stamped(site)
    index = site / "bootfiles/pxelinux.cfg/.hosts"
    with index.open("r+b") as f:
        data = f.read()
        f.seek(0)
        f.write(data)
    edit_beo_02(site)
    assert not stamp.up_to_date(site)
    stamp.claim(load_site(site))
    assert not stamp.outputs_trusted()
    declines(site)
