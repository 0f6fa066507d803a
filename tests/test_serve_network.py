"""`qlimage serve` on a real (virtual) wire: the generated dnsmasq and nginx configs answering a
node in a network namespace.

Two namespaces of our own, joined by a veth pair: the head (10.0.2.2, running `qlimage serve`)
and a node whose MAC the test sets. Nothing touches the host's own network; every namespace,
link and process is removed afterwards, on failure too, and every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qlimage import contract
from qlimage.layout import Layout
from qlimage.serve import nginx

from helpers import HEAD, REPO, qlimage, remove_netns, sh, wait_for_http, write_site

PORT = 8480
REGISTERED = ("52:54:00:12:34:56", "10.0.2.15", "beo-01")
IPXE_HOST = ("52:54:00:12:34:99", "10.0.2.60", "chain-01")  # its boot config chain-loads iPXE
IPXE_HOST_TOML = (
    f'\n[[hosts]]\nname = "{IPXE_HOST[2]}"\nmac = "{IPXE_HOST[0]}"\nbootconfig = "chain"\n'
    f'networks.boot = "{IPXE_HOST[1]}"\n'
)
BIOS, EFI_X86_64 = "0x5d:0000", "0x5d:0007"  # DHCP option 93, client architecture
IPXE_CLIENT = "0xaf:0101"  # option 175, which only iPXE sends
UNREGISTERED_MAC = "52:54:00:99:99:99"
STRANGER = "10.0.2.99"  # on the boot network, but no node of the site
START = 20.0  # seconds for `qlimage serve` to answer
STOP = 15.0  # seconds for it to stop both daemons after SIGTERM
CHECKSUM = "0" * 64 + "  demo.img\n"
BUSYBOX = "/bin/busybox"


@dataclass
class Bed:
    root: Path
    layout: Layout
    head: str  # namespace names
    node: str
    nic: str  # the node's end of the veth pair
    serve: subprocess.Popen[bytes]


def node(bed: Bed, *argv: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", bed.node, *argv], capture_output=True, text=True, timeout=timeout
    )


def publish_checksum(layout: Layout) -> Path:
    """A published image generation holding just its checksum file: what nginx must guard."""
    gen = layout.image_root("demo") / "g1"
    gen.mkdir(parents=True)
    (gen / contract.image_sum_file("demo")).write_text(CHECKSUM)
    os.symlink("g1", layout.image_current("demo"))
    return layout.image_sum("demo")


def wait_http(bed: Bed) -> None:
    wait_for_http(bed.head, f"http://{HEAD}:{PORT}/", bed.serve, START)


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    assert os.geteuid() == 0, "network namespaces need root (CI and scripts/test.sh run as root)"
    # Below a world-traversable directory: nginx and dnsmasq drop root to read what they serve.
    top = Path(tempfile.mkdtemp(prefix="qlimage-serve-", dir="/tmp"))
    os.chmod(top, 0o755)
    tag = uuid.uuid4().hex[:6]
    head_ns, node_ns = f"qlh-{tag}", f"qln-{tag}"
    log = top / "serve.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        root = write_site(top / "site", port=PORT)
        with (root / "site.toml").open("a") as f:
            f.write('\n[bootconfigs.chain]\nimage = "demo"\nloader = "ipxe"\n')
        with (root / "nodes.d/cluster.toml").open("a") as f:
            f.write(IPXE_HOST_TOML)
        qlimage("-C", str(root), "build", "headconfig", "tftpboot")
        layout = Layout(root / "bootfiles")
        publish_checksum(layout)
        sh("ip", "netns", "add", head_ns)
        sh("ip", "netns", "add", node_ns)
        # Both ends are made inside our namespaces: the host's namespace never sees them.
        sh("ip", "-n", head_ns, "link", "add", "vh", "type", "veth", "peer", "name", "vn",
           "netns", node_ns)  # fmt: skip
        for ns, dev in ((head_ns, "vh"), (node_ns, "vn")):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", head_ns, "addr", "add", f"{HEAD}/24", "dev", "vh")
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", head_ns, str(REPO / ".venv/bin/python"), "-m",
                 "qlimage", "-C", str(root), "serve"],
                env=dict(os.environ, PYTHONPATH=str(REPO)),
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        b = Bed(root, layout, head_ns, node_ns, "vn", proc)
        wait_http(b)
        yield b
        # SIGTERM ends serving cleanly: status 0, both daemons gone from the namespace.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP) == 0, log.read_text()
        assert sh("ip", "netns", "pids", head_ns).stdout.split() == []
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP)
        remove_netns(head_ns, node_ns)
        shutil.rmtree(top, ignore_errors=True)


def set_node(bed: Bed, mac: str, *addresses: str) -> None:
    node(bed, "ip", "addr", "flush", "dev", bed.nic)
    node(bed, "ip", "link", "set", bed.nic, "address", mac)
    for a in addresses:
        node(bed, "ip", "addr", "add", f"{a}/24", "dev", bed.nic)


def dhcp(bed: Bed, tmp_path: Path, *options: str) -> dict[str, str] | None:
    """Ask for a lease as a PXE client sending `options` (default: a BIOS one, option 93 = 0);
    the lease's variables, or None."""
    out = tmp_path / "lease.env"
    script = tmp_path / "udhcpc.script"
    script.write_text(f'#!/bin/sh\n[ "$1" = bound ] && env > {out}\nexit 0\n')
    script.chmod(0o755)
    # -n: give up without a lease, after -t 3 discovers -T 1 s apart: a bounded wait.
    proc = node(
        bed, BUSYBOX, "udhcpc", "-i", bed.nic, "-f", "-q", "-n", "-t", "3", "-T", "1",
        *(a for o in options or (BIOS,) for a in ("-x", o)), "-s", str(script),
    )  # fmt: skip
    if not out.exists():
        assert proc.returncode != 0
        return None
    return dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)


def test_registered_mac_gets_its_address_and_hostname(bed: Bed, tmp_path: Path) -> None:
    mac, address, hostname = REGISTERED
    set_node(bed, mac)
    lease = dhcp(bed, tmp_path)
    assert lease is not None
    assert lease["ip"] == address
    assert lease["hostname"] == hostname
    assert lease["boot_file"] == "pxelinux.0"
    assert lease["router"] == HEAD
    assert lease["dns"].split() == [HEAD]


@pytest.mark.parametrize(
    ("host", "options", "boot_file"),
    [
        (REGISTERED, (EFI_X86_64,), "bootx64.efi"),
        (IPXE_HOST, (BIOS,), "undionly.kpxe"),
        (IPXE_HOST, (EFI_X86_64,), "snponly.efi"),
        (IPXE_HOST, (BIOS, IPXE_CLIENT), "boot.ipxe"),
        (IPXE_HOST, (EFI_X86_64, IPXE_CLIENT), "boot.ipxe"),
        (REGISTERED, (BIOS, IPXE_CLIENT), "pxelinux.0"),
    ],
)
def test_boot_file_follows_architecture_and_the_hosts_loader(
    bed: Bed, tmp_path: Path, host: tuple[str, str, str], options: tuple[str, ...], boot_file: str
) -> None:
    mac, address, _ = host
    set_node(bed, mac)
    lease = dhcp(bed, tmp_path, *options)
    assert lease is not None and lease["ip"] == address
    assert lease["boot_file"] == boot_file, lease


def test_unregistered_mac_gets_no_lease(bed: Bed, tmp_path: Path) -> None:
    set_node(bed, UNREGISTERED_MAC)
    started = time.monotonic()
    assert dhcp(bed, tmp_path) is None
    assert time.monotonic() - started < 20


def test_tftp_serves_pxelinux_and_nothing_outside(bed: Bed, tmp_path: Path) -> None:
    set_node(bed, REGISTERED[0], REGISTERED[1])
    got = tmp_path / "pxelinux.0"
    proc = node(bed, BUSYBOX, "tftp", "-g", "-r", "pxelinux.0", "-l", str(got), HEAD)
    assert proc.returncode == 0, proc.stderr
    assert got.read_bytes() == (bed.layout.tftpboot / "pxelinux.0").read_bytes()
    outside = tmp_path / "dnsmasq.conf"
    proc = node(bed, BUSYBOX, "tftp", "-g", "-r", "../head/dnsmasq.conf", "-l", str(outside), HEAD)
    assert proc.returncode != 0
    assert not outside.exists() or outside.stat().st_size == 0


def curl(bed: Bed, path: str, source: str) -> tuple[int, str]:
    proc = node(
        bed, "curl", "-s", "-m", "5", "--interface", source, "-w", "\n%{http_code}",
        f"http://{HEAD}:{PORT}{path}",
    )  # fmt: skip
    body, _, status = proc.stdout.rpartition("\n")
    return int(status), body


def test_http_serves_registered_nodes_only_and_logs_them(bed: Bed) -> None:
    set_node(bed, REGISTERED[0], REGISTERED[1], STRANGER)
    path = f"/{contract.QLUSTAR_DIR}/{contract.image_path('demo')}/current/demo.img.sha256"
    assert curl(bed, path, REGISTERED[1]) == (200, CHECKSUM)
    assert curl(bed, path, STRANGER)[0] == 403
    assert curl(bed, f"/{contract.QLUSTAR_DIR}/", REGISTERED[1])[0] == 403  # no listing
    assert curl(bed, "/head/dnsmasq.conf", REGISTERED[1])[0] == 404  # outside the tree

    log = bed.layout.head_run / nginx.ACCESS_LOG
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and log.read_text().count("\n") < 4:
        time.sleep(0.1)
    entries = [nginx.parse_access(line) for line in log.read_text().splitlines()]
    mine = [e for e in entries if e.path == path]
    assert [(e.address, e.status) for e in mine] == [(REGISTERED[1], 200), (STRANGER, 403)]
    assert mine[0].bytes == len(CHECKSUM)
