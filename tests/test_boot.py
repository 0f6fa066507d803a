"""End-to-end: the built test site PXE-boots in QEMU (TCG) with the same code as `qlimage vm`."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from qlimage.layout import Layout
from qlimage.serve import vm
from qlimage.site import load_site

from helpers import chroot_node, nfs_server, qlimage

pytestmark = [pytest.mark.boot, pytest.mark.network]


def console_of(result: vm.BootResult) -> str:
    return "\n".join(result.console)


def test_node_boots_through_its_host_config_to_init_qlustar(built_site: Path) -> None:
    site = load_site(built_site)
    result = vm.boot(site, "beo-01", timeout=240)
    log = console_of(result)
    assert result.ok, f"{result.reason}\n{result.tail(60)}"
    # pxelinux used the per-host link (0A00020F -> compute), not `default`.
    assert re.search(r"Command line: .*qlustar\.pxecfg=compute\b", log), log
    assert "qlustar.pxecfg=default" not in log
    assert "Linux version 6." in log  # the kernel ran
    assert "qlustar: initrd started" in log  # the initrd's /init ran
    assert re.search(r"qlustar: image demo sha256 ok \([0-9a-f]{64}\)", log)
    sha = (Layout(site).image_sum("demo")).read_text().split()[0]
    assert f"sha256 ok ({sha})" in log
    assert "qlustar: union mounted" in log
    # init.qlustar reports what the kernel says about the mounts: overlay root, squashfs below.
    assert re.search(r"qlustar: root is overlay \(.*lowerdir=/union/image:/union/chroot", log)
    assert "qlustar: union part /union/image is squashfs" in log
    assert "qlustar: init.qlustar started" in log
    # The boot config's extra parameter reached the kernel.
    assert re.search(r"Command line: .* debug\b", log)
    # The node runner fetched and applied this node's bundle, then ran the Root FS
    # Customization scripts in order; the non-root file kept its owner and mode.
    assert re.search(r"qlustar: bundle applied: \d+ files \(sha256 [0-9a-f]{12}\)", log), log
    first = log.index("qlustar: init.d 10-first started")
    assert log.index("qlustar-test: 10-first ran") > first
    second = log.index("qlustar: init.d 20-second started")
    assert second > log.index("qlustar: init.d 10-first exited with status 0")
    assert log.index("qlustar-test: secret daemon:daemon 640") > second
    assert "qlustar: init.d 20-second exited with status 0" in log
    assert "qlustar: handing over to /sbin/init" in log


def test_node_refuses_a_corrupted_image(built_site: Path, tmp_path: Path) -> None:
    site = load_site(built_site)
    good = Layout(site).image("demo")
    bad = tmp_path / "demo.img"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    result = vm.boot(
        site,
        "beo-01",
        timeout=240,
        overrides={f"qlustar/images/demo/{good.parent.resolve().name}/demo.img": bad},
        success=[r"qlustar: init\.qlustar started"],
    )
    log = console_of(result)
    assert not result.ok, log
    assert re.search(r"qlustar: ERROR: image demo sha256 mismatch .*refusing to boot", log), (
        f"{result.reason}\n{result.tail(60)}"
    )
    assert "init.qlustar started" not in log


@contextlib.contextmanager
def rescue_node(root: Path) -> Iterator[None]:
    """A node whose boot config adds `early-shell`, for the length of one test."""
    files = {root / "site.toml": RESCUE_BOOTCONFIG, root / "nodes.d/cluster.toml": RESCUE_HOST}
    saved = {path: path.read_text() for path in files}
    try:
        for path, extra in files.items():
            path.write_text(saved[path] + extra)
        qlimage("-C", str(root), "build")
        yield
    finally:
        for path, text in saved.items():
            path.write_text(text)
        qlimage("-C", str(root), "build")


RESCUE_BOOTCONFIG = '\n[bootconfigs.rescue]\nimage = "demo"\nappend = "early-shell"\n'
RESCUE_HOST = (
    '\n[[hosts]]\nname = "rescue-01"\nmac = "52:54:00:aa:00:01"\nbootconfig = "rescue"\n'
    'networks.boot = "10.0.2.40"\n'
)


def test_early_shell_stops_the_boot_at_init_qlustar(built_site: Path) -> None:
    with rescue_node(built_site):
        site = load_site(built_site)
        result = vm.boot(
            site, "rescue-01", timeout=240, success=[r"qlustar: early-shell requested"], settle=8.0
        )
    log = console_of(result)
    assert result.ok, f"{result.reason}\n{result.tail(60)}"
    assert "qlustar.pxecfg=rescue" in log and "early-shell" in log
    # The shell waits on the console: nothing after init.qlustar's first step runs.
    assert "qlustar: runner started" not in log
    assert "qlustar: handing over" not in log


def test_unverifiable_bundle_leaves_node_unconfigured_but_usable(
    built_site: Path, tmp_path: Path
) -> None:
    site = load_site(built_site)
    host = site.host("beo-01")
    good = Layout(site).bundle(host)
    bad = tmp_path / "bundle.json"
    bad.write_bytes(good.read_bytes().replace(b"beo-01", b"beo-66", 1))
    result = vm.boot(
        site,
        "beo-01",
        timeout=240,
        overrides={f"qlustar/nodes/{host.mac.replace(':', '-')}/bundle.json": bad},
        success=[
            r"qlustar: ERROR: .*nothing written, node stays unconfigured",
            r"qlustar: node is up",
        ],
        failure=[r"Kernel panic"],
    )
    log = console_of(result)
    assert result.ok, f"{result.reason}\n{result.tail(60)}"
    assert "checksum mismatch" in log[log.index("qlustar: ERROR") :].splitlines()[0]
    assert "qlustar: bundle applied" not in log
    assert "qlustar-test:" not in log  # no Root FS Customization script ran
    assert "qlustar: handing over to /sbin/init" in log


def test_node_chroot_is_mounted_in_the_union_slot(built_site: Path, tmp_path: Path) -> None:
    tree = tmp_path / "chroot"
    (tree / "opt").mkdir(parents=True)
    (tree / "opt/chroot-marker").write_text("hello from the NFS chroot\n")
    (tree / "sbin").mkdir()
    (tree / "sbin/init.qlustar").write_text("#!/bin/sh\necho the image's copy must win\n")
    with nfs_server(tree, tmp_path) as port, chroot_node(built_site, port):
        result = vm.boot(load_site(built_site), "chroot-01", timeout=240)
    log = console_of(result)
    assert result.ok, f"{result.reason}\n{result.tail(60)}"
    assert "qlustar: chroot base mounted from 10.0.2.2:/chroot" in log
    assert "qlustar: union part /union/chroot is nfs4" in log
    # A chroot file shows through the union, below the image: the image's init.qlustar ran.
    assert "qlustar-test: chroot says hello from the NFS chroot" in log
    assert "the image's copy must win" not in log
