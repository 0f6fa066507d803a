"""End-to-end: a compute image with the systemd module boots in QEMU (TCG), init.qlustar hands
over to systemd, and the configuration the node runner wrote from the bundle takes effect under
it. Everything is checked from inside the node, over ssh through a QEMU port forward.

The compute image lives in a copy of the session's built test site, not in the demo site: the
demo is built twice by the reproducibility test, and the systemd module would make every demo
build slower for a proof only this test needs (about 35 s per build on an idle machine, minutes
on a busy one)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from qlimage.layout import Layout
from qlimage.serve import vm
from qlimage.site import load_site

from helpers import REPO, clone_built_site, free_port, nfs_server, ntp_server, qlimage

pytestmark = [pytest.mark.boot, pytest.mark.network]

COMPUTE_IMAGE = """\
name = "compute"
flavor = "bookworm"
version = "11"
modules = ["core", "systemd"]
"""

# net.ifnames=0: the initrd brought the boot NIC up under its kernel name, and udev cannot
# rename an interface that is up, so the generated configuration names the kernel's names.
SYSTEMD_SITE = """
[networks.data]
cidr = "10.9.0.0/24"
mtu = 1400

[bootconfigs.systemd]
image = "compute"
append = "net.ifnames=0"
"""

SYSTEMD_HOST = """
[[hosts]]
name = "sd-01"
mac = "52:54:00:aa:00:10"
bootconfig = "systemd"
networks.boot = "10.0.2.42"
networks.data = "10.9.0.15"
[hosts.options]
authorized_keys = [{key}]
network = {{ interfaces = [{{ device = "eth1", network = "data" }}] }}
mounts = [{{ what = "10.0.2.2:/chroot", where = "/srv/data", options = "vers=4.1,port={port},ro" }}]
"""

# A second NIC on its own QEMU user network, restricted (no way out): only the generated
# interfaces.d/qluman configures it, so its address proves that file took effect.
DATA_NIC = [
    "-netdev",
    "user,id=n1,net=10.9.0.0/24,restrict=on",
    "-device",
    "virtio-net-pci,netdev=n1,mac=52:54:00:aa:01:10",
]

HANDOVER = r"qlustar: handing over to /lib/systemd/systemd"
CLOCK_SET = "qlustar: time: clock set from 10.0.2.2 (via chronyd)"
CLOCK_NOT_SET = (
    "qlustar: time: clock NOT set: no answer from 10.0.2.2 within 10s (chronyd); "
    "the boot goes on with the clock as it is"
)
# The node's clock starts years off, so only the head's answer can make it right.
RTC_IN_THE_PAST = ["-rtc", "base=2020-01-01T00:00:00"]
# Once a getty runs on the serial console, systemd stops printing unit status there, so the
# boot is watched up to the handover and followed over ssh from then on.
SSH_WAIT = 240.0  # seconds from the handover to sshd accepting logins, under TCG on a busy host
USERSPACE = re.compile(r"multi-user\.target reached after (?:(\d+)min )?([\d.]+)(m?s) in userspace")


def make_key(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        timeout=30,
    )
    return path.with_suffix(".pub").read_text().strip()


def ssh(port: int, key: Path, command: str) -> subprocess.CompletedProcess[str]:
    argv = [
        "ssh",
        "-F", "none",
        "-i", str(key),
        "-p", str(port),
        "-o", "BatchMode=yes",
        "-o", "IdentitiesOnly=yes",
        "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null",
        "-o", "ConnectTimeout=20",
        "-o", "LogLevel=ERROR",
        "root@127.0.0.1",
        command,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def wait_for_ssh(port: int, key: Path) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + SSH_WAIT
    while True:
        proc = ssh(port, key, "true")
        if proc.returncode == 0 or time.monotonic() > deadline:
            return proc
        time.sleep(2)


def add_systemd_node(root: Path, key: str, nfs_port: int) -> None:
    shutil.copytree(REPO / "modules/systemd", root / "modules/systemd", symlinks=True)
    (root / "images.d/compute.toml").write_text(COMPUTE_IMAGE)
    with (root / "site.toml").open("a") as f:
        f.write(SYSTEMD_SITE)
    with (root / "nodes.d/cluster.toml").open("a") as f:
        f.write(SYSTEMD_HOST.format(key=f'"{key}"', port=nfs_port))


@dataclass(frozen=True)
class ComputeSite:
    root: Path
    admin: Path  # the key in the node's generated authorized_keys
    stranger: Path  # a key that is not
    nfs_port: int
    build_seconds: float


@pytest.fixture(scope="module")
def compute(built_site: Path, tmp_path_factory: pytest.TempPathFactory) -> ComputeSite:
    work = tmp_path_factory.mktemp("compute")
    admin, stranger = work / "admin", work / "stranger"
    admin_pub, _ = make_key(admin), make_key(stranger)
    nfs_port = free_port()
    root = clone_built_site(built_site, work / "site")
    add_systemd_node(root, admin_pub, nfs_port)
    started = time.monotonic()
    qlimage("-C", str(root), "build")
    return ComputeSite(root, admin, stranger, nfs_port, time.monotonic() - started)


def test_systemd_node_runs_the_generated_configuration(
    compute: ComputeSite, tmp_path: Path
) -> None:
    admin, stranger, ssh_port = compute.admin, compute.stranger, free_port()
    site = load_site(compute.root)
    image = Layout(site).image("compute")
    export = tmp_path / "export"
    export.mkdir()
    (export / "marker").write_text("served by the head over NFS\n")

    out: dict[str, subprocess.CompletedProcess[str]] = {}
    seen: dict[str, float] = {}

    def note(line: str) -> None:
        if re.search(HANDOVER, line) and "handover" not in seen:
            seen["handover"] = time.monotonic() - boot_start

    def inside() -> None:
        out["login"] = wait_for_ssh(ssh_port, admin)
        if out["login"].returncode != 0:
            return
        for name, command in CHECKS.items():
            out[name] = ssh(ssh_port, admin, command)
        out["stranger"] = ssh(ssh_port, stranger, "true")

    with nfs_server(export, tmp_path, port=compute.nfs_port), ntp_server(tmp_path):
        boot_start = time.monotonic()
        result = vm.boot(
            site,
            "sd-01",
            timeout=420,
            success=[HANDOVER],
            hostfwd=[f"tcp:127.0.0.1:{ssh_port}-:22"],
            devices=[*DATA_NIC, *RTC_IN_THE_PAST],
            while_up=inside,
            on_line=note,
        )
        host_time = time.time()
    log = "\n".join(result.console)
    assert result.ok, f"{result.reason}\n{result.tail(80)}"
    report = {k: (v.returncode, v.stdout, v.stderr) for k, v in out.items()}
    # The seed's steps 5 and 6: udev from init.qlustar, the runner, then systemd as PID 1.
    assert re.search(r"qlustar: udev started \(/lib/systemd/systemd-udevd\)", log), log
    assert re.search(r"qlustar: bundle applied: \d+ files", log), log
    assert log.index("qlustar: bundle applied") < log.index("qlustar: handing over to")
    # Before the handover: our udevd leaves, and systemd gets a machine ID (no "first boot").
    assert "qlustar: udev stopped for /lib/systemd/systemd" in log
    assert re.search(r"qlustar: machine ID [0-9a-f]{32}\b", log), log

    login = out["login"]
    assert login.returncode == 0, f"root login with the generated key failed: {report}"
    # A key not in the generated authorized_keys is refused.
    assert out["stranger"].returncode == 255, report
    assert "Permission denied (publickey)" in out["stranger"].stderr, report

    assert out["pid1"].stdout.strip() == "systemd", report
    assert out["multi-user"].stdout.strip() == "active", report
    # Every unit came up: no failed unit makes the system "degraded".
    assert out["running"].stdout.splitlines()[0] == "running", report
    # The generated interfaces.d/qluman brought eth1 up with the data network's address/MTU.
    assert "inet 10.9.0.15/24" in out["eth1"].stdout, report
    assert re.search(r"eth1: <[^>]*\bUP,LOWER_UP\b[^>]*> mtu 1400 ", out["eth1"].stdout), report
    assert out["networking"].stdout.strip() == "active", report
    # The generated mount unit is active, and the head's file shows through it.
    assert out["mount"].stdout.strip() == "active", report
    assert out["marker"].stdout == "served by the head over NFS\n", report
    mounts = out["mounts"].stdout
    assert re.search(r"^10\.0\.2\.2:/chroot /srv/data nfs4 ro,", mounts, re.M), report
    assert "bundle applied" in out["runner-log"].stdout, report
    # The node's RTC said 2020: the runner set the clock from the head (option time's default
    # server) before systemd, and chrony keeps it with the generated configuration.
    assert log.index(CLOCK_SET) < log.index("qlustar: bundle applied"), log
    assert abs(int(out["date"].stdout) - host_time) < 300, report
    assert out["chrony"].stdout.strip() == "active", report
    assert re.search(r"^\^. 10\.0\.2\.2 ", out["chrony-sources"].stdout, re.M), report

    # Boot time to multi-user.target: QEMU start to the handover, then systemd's own count.
    userspace = USERSPACE.search(out["analyze"].stdout)
    assert userspace, report
    seconds = float(userspace[2]) / (1000 if userspace[3] == "ms" else 1)
    seconds += 60 * int(userspace[1] or 0)
    size = image.stat().st_size
    print(
        f"\nsystemd node: image {size / 2**20:.1f} MiB, build {compute.build_seconds:.0f} s, "
        f"multi-user.target {seen['handover'] + seconds:.0f} s after QEMU start "
        f"(handover {seen['handover']:.0f} s + {seconds:.0f} s in systemd)"
    )


CHECKS = {
    "pid1": "cat /proc/1/comm",
    "multi-user": "systemctl is-active multi-user.target",
    "running": "systemctl is-system-running --wait; systemctl --failed --no-legend",
    "eth1": "ip -4 addr show dev eth1; ip link show dev eth1",
    "networking": "systemctl is-active networking.service",
    "mount": "systemctl is-active srv-data.mount",
    "marker": "cat /srv/data/marker",
    "mounts": "cat /proc/mounts",
    "runner-log": "cat /var/log/qlustar/runner.log",
    "date": "date +%s",
    "chrony": "systemctl is-active chrony.service",
    "chrony-sources": "chronyc -n sources",
    "analyze": "systemctl is-system-running --wait >/dev/null; systemd-analyze time",
}


def test_head_not_answering_for_time_does_not_stop_the_boot(compute: ComputeSite) -> None:
    # No NTP server on the head this time: one bounded attempt, said on the console, and the
    # node goes on to systemd.
    result = vm.boot(load_site(compute.root), "sd-01", timeout=300, success=[HANDOVER])
    log = "\n".join(result.console)
    assert result.ok, f"{result.reason}\n{result.tail(80)}"
    assert CLOCK_NOT_SET in log, log
    assert log.index(CLOCK_NOT_SET) < log.index("qlustar: handing over to")
