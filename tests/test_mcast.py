"""ql-mcastd and the initrd's multicast client: the control protocol, the site settings, the
initrd's udp-receiver, and real udpcast sessions between network namespaces.

The namespace bed: a head namespace holding a bridge, and receiver namespaces each joined to it by
a veth pair (private addresses, a broadcast address and a multicast route on every interface:
udpcast needs both). Every namespace, link and process is removed afterwards, on failure too;
every wait is bounded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qlimage import contract
from qlimage.boot.cmdline import kernel_command_line
from qlimage.errors import QlimageError
from qlimage.image import initrd
from qlimage.serve import head, mcastd
from qlimage.serve.mcastd import Config, Scheduler
from qlimage.site import load_site

from helpers import REPO, assert_refused, mcastd_sessions, write_site

CLIENT = REPO / "qlimage/node/initrd/ql-mcast-client"
INIT = REPO / "qlimage/node/initrd/init"
BUSYBOX = "/bin/busybox"
WAIT = 60.0  # seconds any one network scenario may take
IMAGE, GEN = "demo", "0123456789abcdef"


def publish(images: Path, data: bytes, image: str = IMAGE, gen: str = GEN) -> Path:
    """A published generation as the build leaves it: `generation` names it, the image beside."""
    d = images / image / gen
    d.mkdir(parents=True)
    (d / contract.GENERATION).write_text(gen + "\n")
    (d / contract.image_file(image)).write_bytes(data)
    os.symlink(gen, images / image / contract.CURRENT)
    return d / contract.image_file(image)


def config(images: Path, **changes: object) -> Config:
    base = Config(
        address="10.78.0.1",
        port=5000,
        images=images,
        group_base="232.9.0.0",
        groups=8,
        data_port_first=6001,
        data_port_last=6099,
        window=2.0,
        max_bitrate="600m",
        clients=("10.78.0.0/24", "127.0.0.0/8"),
    )
    return Config(**{**base.__dict__, **changes})  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    publish(root, b"squashfs bytes")
    return root


# --- the control protocol ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        b"",
        b"\n",
        b"GET demo\n",
        b"GET demo 0123456789abcdef extra\n",
        b"PUT demo 0123456789abcdef\n",
        b"get demo 0123456789abcdef\n",
        b"GET  demo 0123456789abcdef\n",
        b"GET Demo 0123456789abcdef\n",
        b"GET ../demo 0123456789abcdef\n",
        b"GET demo ../0123456789abcdef\n",
        b"GET demo .hidden\n",
        b"GET demo current\n",
        b"GET demo 0123456789abcdef\t\n",
        b"GET demo \xff\xfe\n",
        b"GET demo " + b"a" * 300 + b"\n",
    ],
    ids=[
        "empty",
        "blank-line",
        "missing-generation",
        "extra-field",
        "other-verb",
        "lower-case-verb",
        "double-space",
        "upper-case-image",
        "image-path",
        "generation-path",
        "hidden-generation",
        "current-link-not-a-generation",
        "tab",
        "not-ascii",
        "too-long",
    ],
)
def test_bad_request_is_refused(images: Path, request_: bytes) -> None:
    sched = Scheduler(config(images), Clock())
    assert sched.answer(request_, "10.78.0.11").startswith("NO ")
    assert sched.sessions == {}


def test_unknown_image_or_generation_is_refused(images: Path) -> None:
    sched = Scheduler(config(images), Clock())
    assert sched.answer(b"GET demo fedcba9876543210\n", "10.78.0.11").startswith("NO no published")
    assert sched.answer(b"GET other 0123456789abcdef\n", "10.78.0.11").startswith("NO ")
    assert sched.sessions == {}


def test_generation_leading_out_of_the_tree_is_refused(images: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    publish(outside, b"secret", gen="fedcba9876543210")
    os.symlink(outside / IMAGE / "fedcba9876543210", images / IMAGE / "fedcba9876543210")
    sched = Scheduler(config(images), Clock())
    assert sched.answer(b"GET demo fedcba9876543210\n", "10.78.0.11").startswith("NO ")


def test_half_written_generation_is_refused(images: Path) -> None:
    (images / IMAGE / GEN / contract.GENERATION).write_text("something else\n")
    sched = Scheduler(config(images), Clock())
    assert sched.answer(b"GET demo 0123456789abcdef\n", "10.78.0.11").startswith("NO ")


def test_unregistered_address_is_refused(images: Path) -> None:
    sched = Scheduler(config(images), Clock())
    assert sched.answer(b"GET demo 0123456789abcdef\n", "10.99.0.5").startswith("NO ")


def test_askers_within_the_window_share_one_session(images: Path) -> None:
    clock = Clock()
    sched = Scheduler(config(images), clock)
    answers = []
    for peer, at in (("10.78.0.11", 0.0), ("10.78.0.12", 1.0), ("10.78.0.13", 1.9)):
        clock.now = 100.0 + at
        answers.append(sched.answer(b"GET demo 0123456789abcdef\n", peer).split())
    assert {tuple(a[:4]) for a in answers} == {("OK", "232.9.0.0", "6001", "1")}
    assert [int(a[4]) for a in answers] == [2000, 1000, 100]  # until the window closes
    assert {a[5] for a in answers} == {str(len(b"squashfs bytes"))}  # the image's size
    assert sched.due() == []
    clock.now = 102.0
    (s,) = sched.due()
    assert s.peers == {"10.78.0.11", "10.78.0.12", "10.78.0.13"}
    args = mcastd.sender_args(sched.config, s)
    assert args[args.index("--min-receivers") + 1] == "3"


def test_later_asker_gets_a_later_session(images: Path) -> None:
    clock = Clock()
    sched = Scheduler(config(images), clock)
    first = sched.answer(b"GET demo 0123456789abcdef\n", "10.78.0.11").split()
    clock.now += 2.5
    sched.due()[0].started = clock.now  # the first session is on the wire
    later = sched.answer(b"GET demo 0123456789abcdef\n", "10.78.0.14").split()
    assert first[:4] == ["OK", "232.9.0.0", "6001", "1"]
    assert later[:4] == ["OK", "232.9.0.1", "6003", "2"]


def test_sessions_are_bounded_by_the_group_and_port_pool(images: Path) -> None:
    publish(images, b"x", image="other")
    sched = Scheduler(config(images, groups=1), Clock())
    assert sched.answer(b"GET demo 0123456789abcdef\n", "10.78.0.11").startswith("OK ")
    assert (
        sched.answer(b"GET other 0123456789abcdef\n", "10.78.0.11")
        == "NO all 1 multicast sessions busy"
    )


# udp-sender's stderr as captured (udpcast 20120424): a complete 30 MB session, and one whose
# only receiver was killed after the first slices (--retries-until-drop 5).
SENDER_COMPLETE = (
    b"Udp-sender 20120424\nUDP sender for /tmp/g5/img.bin at 10.79.0.1 on g5capv \n"
    b"Broadcasting control to 232.9.0.1\nNew connection from 10.79.0.11  (#0) 00000009\n"
    b"Starting transfer: 00000009\n"
    b"bytes=  5 963 776  re-xmits=0000000 (  0.0%) slice=1024 -   0\r"
    b"bytes= 13 418 496  re-xmits=0000000 (  0.0%) slice=1024 -   0\r"
    b"bytes= 20 873 216  re-xmits=0000000 (  0.0%) slice=1024 -   0\r"
    b"bytes= 28 327 936  re-xmits=0000000 (  0.0%) slice=1024 -   0\r"
    b"bytes= 30 000 000  re-xmits=0000000 (  0.0%) slice=1024 -   0\r\n"
    b"Transfer complete.\x07\nDisconnecting #0 (10.79.0.11)\n\n"
)
SENDER_DROPPED = (
    b"Udp-sender 20120424\nUDP sender for /tmp/g5/img.bin at 10.79.0.1 on g5capv \n"
    b"Broadcasting control to 232.9.0.1\nNew connection from 10.79.0.11  (#0) 00000009\n"
    b"Starting transfer: 00000009\n"
    b"bytes=  1 490 944  re-xmits=0000000 (  0.0%) slice=1024 -   0\r\n"
    b"Timeout notAnswered=[0] notReady=[0] nrAns=0 nrRead=0 nrPart=1 avg=10000\n"
    b"Dropping client #0 because of timeout\nDisconnecting #0 (10.79.0.11)\n"
    b"bytes=  1 490 944  re-xmits=0000000 (  0.0%) slice=1024 -   0\r\n"
    b"Transfer complete.\x07\n\n"
)


def test_sender_statistics_are_read_as_they_come() -> None:
    out = mcastd.SenderOutput()
    cut = SENDER_COMPLETE.index(b"13 418") + 3  # a record cut in the middle waits for its end
    out.feed(SENDER_COMPLETE[:cut])
    assert (out.sent, out.receivers) == (5_963_776, 1)
    out.feed(SENDER_COMPLETE[cut:])
    assert (out.sent, out.receivers, out.read) == (30_000_000, 1, len(SENDER_COMPLETE))
    dropped = mcastd.SenderOutput()
    for i in range(0, len(SENDER_DROPPED), 7):
        dropped.feed(SENDER_DROPPED[i : i + 7])
    assert (dropped.sent, dropped.joined, dropped.receivers) == (1_490_944, 1, 0)


def test_session_progress_is_logged_every_ten_percent_and_stops_short_on_failure(
    images: Path,
) -> None:
    """The daemon's log lines for a session, fed udp-sender's captured output at 1 s a record."""

    def logged(output: bytes, size: int) -> list[str]:
        log, clock = io.StringIO(), Clock()
        daemon = mcastd.Daemon(config(images), log=log, clock=clock)
        s = daemon.scheduler.open(IMAGE, GEN, images / IMAGE / GEN / "demo.img", clock())
        s.size, s.peers, s.started = size, {"10.78.0.11"}, clock()
        with tempfile.TemporaryFile() as s.output:  # as the sender's stdout and stderr
            for record in re.split(rb"(?<=[\r\n])", output):
                clock.now += 1.0
                s.output.write(record)
                s.output.flush()
                daemon.report(s)
            daemon.finish(s, "ok")
        return log.getvalue().splitlines()

    lines = logged(SENDER_COMPLETE, 30_000_000)
    label = f"ql-mcastd: sending session 1 ({IMAGE} {GEN}):"
    assert lines[:-1] == [
        f"{label}  70 % (20.9 MB of 30.0 MB, 1 of 1 receivers)",  # 2 s after the first bytes
        f"{label}  94 % (28.3 MB of 30.0 MB, 1 of 1 receivers)",
        f"{label} 100 % (30.0 MB of 30.0 MB, 1 of 1 receivers)",
    ]
    assert lines[-1].startswith("ql-mcastd: session 1 image demo ") and "bytes" in lines[-1]
    # the receiver dropped: udp-sender still says complete, the log does not claim 100 %
    lines = logged(SENDER_DROPPED, 30_000_000)
    assert not [line for line in lines if "100 %" in line], lines
    assert lines[-2] == f"{label}   5 % (1.5 MB of 30.0 MB, 0 of 1 receivers)"


def test_rendered_config_loads_and_follows_the_site(tmp_path: Path) -> None:
    site = load_site(write_site(tmp_path / "site"))
    text = mcastd.render(site)
    path = tmp_path / "mcastd.json"
    path.write_text(text)
    c = mcastd.load_config(path)
    assert (c.address, c.port, c.group_base, c.window) == (site.head_address, 5000, "232.1.0.0", 3)
    assert c.allows(site.boot_address(site.hosts[0])) and not c.allows("10.0.2.99")
    assert mcastd.config_path(site) in head.configs(site)


@pytest.mark.parametrize(
    "key,value",
    [("port", 0), ("address", "10.0.2.300"), ("group_base", "10.0.0.1"), ("window", "3"),
     ("max_bitrate", "fast"), ("clients", ["10.0.0.0/33"]), ("format", 2)],
)  # fmt: skip
def test_bad_config_field_is_named(tmp_path: Path, key: str, value: object) -> None:
    site = load_site(write_site(tmp_path / "site"))
    raw = json.loads(mcastd.render(site))
    raw[key] = value
    path = tmp_path / "mcastd.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(QlimageError, match=f"mcastd.json: {key}: "):
        mcastd.load_config(path)


# --- site settings and the kernel command line ------------------------------------------------


def test_command_line_names_the_daemon_and_follows_the_settings(tmp_path: Path) -> None:
    root = write_site(tmp_path / "site")
    site = load_site(root)
    bc = site.bootconfigs["compute"]
    assert f"qlustar.mcast={site.head_address}:5000" in kernel_command_line(site, bc, "default")
    with (root / "site.toml").open("a") as f:
        f.write('\n[multicast]\naddress = "10.0.2.3"\nport = 4999\n')
    site = load_site(root)
    assert "qlustar.mcast=10.0.2.3:4999" in kernel_command_line(site, bc, "default").split()
    (root / "site.toml").write_text(
        (root / "site.toml").read_text().replace("port = 4999\n", "port = 4999\nenabled = false\n")
    )
    assert "qlustar.mcast" not in kernel_command_line(load_site(root), bc, "default")


@pytest.mark.parametrize(
    "setting,field",
    [
        ("port = 5500", "multicast.port"),
        ('group_base = "10.1.0.0"', "multicast.group_base"),
        ('group_base = "224.0.0.1"', "multicast.group_base"),
        ('group_base = "239.255.255.0"\ngroups = 512', "multicast.group_base"),
        ("data_port_first = 6000\ndata_port_last = 6000", "multicast.data_port_last"),
        ("window = 0", "multicast.window"),
        ('max_bitrate = "600 m; rm -rf /"', "multicast.max_bitrate"),
        ('address = "head"', "multicast.address"),
        ("enabled = 1", "multicast.enabled"),
        ('colour = "red"', "multicast"),
    ],
    ids=[
        "control-port-inside-data-ports",
        "group-not-multicast",
        "group-link-local",
        "groups-past-the-range",
        "single-data-port",
        "window-zero",
        "bitrate-with-shell",
        "address-not-ipv4",
        "enabled-not-boolean",
        "unknown-key",
    ],
)
def test_bad_multicast_setting_is_refused(tmp_path: Path, setting: str, field: str) -> None:
    root = write_site(tmp_path / "site")
    with (root / "site.toml").open("a") as f:
        f.write(f"\n[multicast]\n{setting}\n")
    proc = assert_refused(root, names="site.toml")
    assert field in proc.stderr


# --- the initrd carries udp-receiver ----------------------------------------------------------


@pytest.fixture(scope="module")
def mcast_debs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qlimage.image.generations import extract_multicast_debs

    base = tmp_path_factory.mktemp("mcast-debs")
    site = load_site(write_site(base / "site"))
    return extract_multicast_debs(site, base / "debs")


def test_initrd_carries_a_working_udp_receiver(tmp_path: Path, mcast_debs: Path) -> None:
    kver = "6.1.0-99-amd64"
    mods = tmp_path / "lib/modules" / kver
    mods.mkdir(parents=True)
    (mods / "modules.dep").write_text("")
    (mods / "modules.builtin").write_text("")
    out = tmp_path / "initrd.img"
    initrd.build_initrd(
        out, busybox=Path(BUSYBOX), kernel_modules=mods, kver=kver, modules=[], epoch=1700000000,
        multicast=mcast_debs,
    )  # fmt: skip
    root = tmp_path / "root"
    root.mkdir()
    listing = subprocess.run(
        f"gzip -dc {out} | cpio -idm --quiet --no-absolute-filenames && find . | sort",
        shell=True, cwd=root, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split()  # fmt: skip
    for rel in initrd.multicast_files("amd64"):
        assert f"./{rel}" in listing, rel
    assert (
        os.readlink(root / "lib64/ld-linux-x86-64.so.2")
        == "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    )
    # The archive's udp-receiver runs with nothing but the initrd's own files: the loader and
    # the libraries resolve inside it (an unknown option makes it print its usage and stop).
    proc = subprocess.run(
        ["chroot", str(root), "/usr/bin/udp-receiver", "--no-such-option"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "udp-receiver [--file file]" in proc.stdout + proc.stderr, proc
    proc = subprocess.run(
        ["chroot", str(root), "/bin/sh", "-c", "/bin/ql-mcast-client; echo status=$?"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "usage: ql-mcast-client" in proc.stdout and "status=2" in proc.stdout, proc


def test_initrd_multicast_client_is_refused_for_an_unknown_arch(tmp_path: Path) -> None:
    with pytest.raises(QlimageError, match="not packaged for architecture 'mips'"):
        initrd.add_multicast_client(tmp_path, tmp_path, "mips")


# --- udpcast between namespaces ---------------------------------------------------------------


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=check)


@dataclass
class Bed:
    head: str
    nodes: list[str]  # receiver namespaces, addresses 10.78.0.11 ...


NODES = 8  # the receivers of the bed: one shared session must serve all of them
HEAD = "10.78.0.1"


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    tag = uuid.uuid4().hex[:6]
    b = Bed(f"qlm-{tag}-h", [f"qlm-{tag}-{i}" for i in range(NODES)])
    try:
        sh("ip", "netns", "add", b.head)
        sh("ip", "-n", b.head, "link", "set", "lo", "up")
        sh("ip", "-n", b.head, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", b.head, "addr", "add", f"{HEAD}/24", "brd", "+", "dev", "br0")
        sh("ip", "-n", b.head, "link", "set", "br0", "up")
        sh("ip", "-n", b.head, "route", "add", "224.0.0.0/4", "dev", "br0")
        for i, ns in enumerate(b.nodes):
            sh("ip", "netns", "add", ns)
            veth = f"qlm{tag}{i}"
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", veth, "netns", b.head)
            sh("ip", "-n", b.head, "link", "set", veth, "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"10.78.0.{11 + i}/24", "brd", "+", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield b
    finally:
        for ns in [b.head, *b.nodes]:
            sh("ip", "netns", "del", ns, check=False)


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    log: Path

    def sessions(self) -> list[dict[str, str]]:
        return mcastd_sessions(self.log.read_text())


@pytest.fixture
def daemon(bed: Bed, tmp_path: Path) -> Iterator[Daemon]:
    with run_daemon(bed, tmp_path, "600m") as d:
        yield d


@pytest.fixture
def slow_daemon(bed: Bed, tmp_path: Path) -> Iterator[Daemon]:
    """A daemon whose sessions take seconds (8 MiB at 24 Mbit/s): time to kill a receiver."""
    with run_daemon(bed, tmp_path, "24m") as d:
        yield d


@contextlib.contextmanager
def run_daemon(bed: Bed, tmp_path: Path, bitrate: str) -> Iterator[Daemon]:
    images = tmp_path / "images"
    publish(images, os.urandom(8 * 2**20))
    cfg = {
        "format": 1, "address": HEAD, "port": 5000, "images": str(images),
        "group_base": "232.9.0.0", "groups": 8, "data_port_first": 6001,
        "data_port_last": 6099, "window": 2, "max_bitrate": bitrate, "clients": ["10.78.0.0/24"],
    }  # fmt: skip
    path = tmp_path / "mcastd.json"
    path.write_text(json.dumps(cfg))
    log = tmp_path / "mcastd.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", bed.head, mcastd_python(), "-m", "qlimage.serve.mcastd",
             "--config", str(path)],
            stderr=f, start_new_session=True,
        )  # fmt: skip
    d = Daemon(proc, log)
    try:
        deadline = time.monotonic() + 20
        while "listening" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield d
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def mcastd_python() -> str:
    import sys

    return sys.executable


def client(ns: str, out: Path, server: str = f"{HEAD}:5000") -> subprocess.Popen[str]:
    """The initrd's client, run by busybox sh like /init runs it (in a process group of its
    own, so a test can kill it with its udp-receiver like a node that dies)."""
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, BUSYBOX, "sh", str(CLIENT), server, IMAGE, GEN, str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def finish(procs: list[subprocess.Popen[str]]) -> list[tuple[int, str]]:
    deadline = time.monotonic() + WAIT
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            raise AssertionError(f"client did not finish in time: {out}") from None
        results.append((p.returncode, out))
    return results


def wait_sessions(d: Daemon, n: int) -> list[dict[str, str]]:
    deadline = time.monotonic() + WAIT
    while len(d.sessions()) < n:
        assert time.monotonic() < deadline, d.log.read_text()
        time.sleep(0.2)
    return d.sessions()


def test_receivers_in_one_window_share_one_session(
    bed: Bed, daemon: Daemon, tmp_path: Path
) -> None:
    image = (tmp_path / "images" / IMAGE / GEN / contract.image_file(IMAGE)).read_bytes()
    outs = [tmp_path / f"r{i}.img" for i in range(NODES)]
    results = finish([client(ns, out) for ns, out in zip(bed.nodes, outs, strict=True)])
    assert all(code == 0 for code, _ in results), results
    (session,) = wait_sessions(daemon, 1)
    assert session["receivers"] == str(NODES) and session["status"] == "ok", session
    assert session["bytes"] == str(len(image))
    assert all(out.read_bytes() == image for out in outs)


def test_receiver_after_the_window_gets_a_later_session(
    bed: Bed, daemon: Daemon, tmp_path: Path
) -> None:
    image = (tmp_path / "images" / IMAGE / GEN / contract.image_file(IMAGE)).read_bytes()
    outs = [tmp_path / f"r{i}.img" for i in range(3)]
    early = [client(ns, out) for ns, out in zip(bed.nodes[:2], outs[:2], strict=True)]
    time.sleep(3.0)  # the 2 s window has closed
    late = client(bed.nodes[2], outs[2])
    results = finish([*early, late])
    assert all(code == 0 for code, _ in results), results
    sessions = wait_sessions(daemon, 2)
    assert [(s["session"], s["receivers"]) for s in sessions] == [("1", "2"), ("2", "1")]
    assert (
        sessions[0]["group"] != sessions[1]["group"] or sessions[0]["port"] != sessions[1]["port"]
    )
    assert all(out.read_bytes() == image for out in outs)


def test_receiver_killed_mid_transfer_does_not_stall_the_others(
    bed: Bed, slow_daemon: Daemon, tmp_path: Path
) -> None:
    image = (tmp_path / "images" / IMAGE / GEN / contract.image_file(IMAGE)).read_bytes()
    outs = [tmp_path / f"r{i}.img" for i in range(4)]
    procs = [client(ns, out) for ns, out in zip(bed.nodes[:4], outs, strict=True)]
    victim = procs.pop()
    deadline = time.monotonic() + WAIT
    while not (outs[-1].exists() and 0 < outs[-1].stat().st_size < len(image) // 2):
        assert victim.poll() is None and time.monotonic() < deadline, "no transfer under way"
        time.sleep(0.05)
    os.killpg(victim.pid, 9)  # the node dies with its udp-receiver, mid-stream
    victim.wait()
    results = finish(procs)
    assert all(code == 0 for code, _ in results), results
    assert all(out.read_bytes() == image for out in outs[:-1])
    (session,) = wait_sessions(slow_daemon, 1)
    assert session["receivers"] == "4" and session["status"] == "ok", session


def test_session_progress_shows_in_the_heads_log_and_on_the_nodes(bed: Bed, tmp_path: Path) -> None:
    """8 MiB at 16 Mbit/s: a transfer of about 4 s, long enough for lines on both sides."""
    with run_daemon(bed, tmp_path, "16m") as daemon:
        outs = [tmp_path / f"r{i}.img" for i in range(2)]
        results = finish([client(ns, out) for ns, out in zip(bed.nodes, outs, strict=False)])
        (session,) = wait_sessions(daemon, 1)
    assert all(code == 0 for code, _ in results), results
    assert session["status"] == "ok", session
    size = int(session["bytes"])
    log = daemon.log.read_text().splitlines()
    sent = r"ql-mcastd: sending session 1 \(demo 0123456789abcdef\): +(\d+) % \(([\d.]+) MB of "
    steps = [m for line in log if (m := re.fullmatch(sent + r"8\.4 MB, 2 of 2 receivers\)", line))]
    assert len(steps) >= 2, log  # the first after 2 s, then every 10 % or 5 s, ...
    assert [int(m[1]) for m in steps] == sorted(int(m[1]) for m in steps)
    assert steps[-1][1] == "100"  # ... the last at 100 %, just before the session's line
    assert log[-1].startswith("ql-mcastd: session 1 ") and re.fullmatch(sent + ".*", log[-2])
    for _, out in results:  # each node: udp-receiver's count of the size the daemon announced
        got = re.findall(r"qlustar: multicast: session 1: (\d+) % \([\d.]+ MB of 8\.4 MB\)", out)
        assert len(got) >= 2 and got[-1] == "100", out
        assert [int(p) for p in got] == sorted(int(p) for p in got), out
    assert size == 8 * 2**20


def test_client_fails_fast_without_a_daemon(bed: Bed, tmp_path: Path) -> None:
    out = tmp_path / "r.img"
    start = time.monotonic()
    ((code, text),) = finish([client(bed.nodes[0], out, server=f"{HEAD}:5999")])
    assert code != 0 and "qlustar: multicast: no answer from ql-mcastd" in text, text
    assert time.monotonic() - start < 10
    assert not out.exists()


# --- the init's seam: a bad multicast image costs an HTTP download, never the boot ------------


def seam_script(run_dir: Path) -> str:
    """The init's image step (multicast, fallback, verification), cut from the real /init."""
    text = INIT.read_text()
    start = text.index("fetch_multicast() {")
    end = text.index('log "image $IMAGE sha256 ok ($got)"')
    body = text[start:end] + 'log "image $IMAGE sha256 ok ($got)"\n'
    # The initrd's wget is busybox's (its -S headers give the download's length), not the host's.
    tools = run_dir / "bin"
    tools.mkdir()
    (tools / "wget").symlink_to(BUSYBOX)
    prelude = (
        'log() { echo "qlustar: $*"; }\n'
        'fail() { log "ERROR: $*"; exit 1; }\n'
        f'PATH={CLIENT.parent}:{tools}:$PATH\n'
    )  # fmt: skip
    return prelude + body.replace("/run/qlustar", str(run_dir))


@pytest.fixture
def http(bed: Bed, tmp_path: Path) -> Iterator[Path]:
    """busybox httpd in the head namespace serving a good copy of the image generation."""
    root = tmp_path / "www"
    sums = publish(root / contract.IMAGES_DIR, os.urandom(2 * 2**20))
    digest = subprocess.run(["sha256sum", str(sums)], capture_output=True, text=True).stdout
    (sums.parent / contract.image_sum_file(IMAGE)).write_text(
        contract.checksum_line(digest.split()[0], contract.image_file(IMAGE))
    )
    proc = subprocess.Popen(
        ["ip", "netns", "exec", bed.head, BUSYBOX, "httpd", "-f", "-p", f"{HEAD}:8081",
         "-h", str(root)], start_new_session=True,
    )  # fmt: skip
    try:
        time.sleep(0.5)
        yield sums
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def run_seam(bed: Bed, tmp_path: Path, mcast: str) -> tuple[str, Path]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    img = run_dir / "demo.img"
    env = (
        f"HTTP=http://{HEAD}:8081 IMAGE={IMAGE} IMGPATH={contract.image_path(IMAGE)}"
        f" SUMPATH={contract.image_sum_file(IMAGE)} MCAST={mcast} IMG={img} GEN={GEN}"
        f" GENDIR=http://{HEAD}:8081/{contract.image_path(IMAGE)}/{GEN}"
    )
    script = f"{env}\n{seam_script(run_dir)}"
    proc = subprocess.run(
        ["ip", "netns", "exec", bed.nodes[3], BUSYBOX, "sh", "-c", script],
        capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, img


def test_corrupted_multicast_image_falls_back_to_http(
    bed: Bed, daemon: Daemon, http: Path, tmp_path: Path
) -> None:
    # The daemon's copy differs from the one HTTP serves with its checksum: a damaged stream.
    out, img = run_seam(bed, tmp_path, f"{HEAD}:5000")
    assert "received by multicast" not in out
    assert "qlustar: multicast: image sha256 mismatch, discarding it" in out, out
    assert "multicast failed, falling back to unicast" in out
    assert re.search(r"sha256 ok", out)
    assert img.read_bytes() == http.read_bytes()


def test_unicast_download_shows_progress(bed: Bed, http: Path, tmp_path: Path) -> None:
    """The head's link held to 4 Mbit/s: the 2 MiB image takes about 4 s, shown every 10 % or
    5 s of the length the server announced."""
    sh("ip", "netns", "exec", bed.head, "tc", "qdisc", "add", "dev", "br0", "root", "tbf",
       "rate", "4mbit", "burst", "16kb", "latency", "200ms")  # fmt: skip
    try:
        out, img = run_seam(bed, tmp_path, "off")
    finally:
        sh("ip", "netns", "exec", bed.head, "tc", "qdisc", "del", "dev", "br0", "root")
    steps = re.findall(r"qlustar: image demo: (\d+) % \([\d.]+ MB of 2\.1 MB\)", out)
    assert len(steps) >= 2 and steps[-1] == "100", out
    assert [int(p) for p in steps] == sorted(int(p) for p in steps), out
    assert img.read_bytes() == http.read_bytes()


def test_daemon_down_falls_back_to_http(bed: Bed, http: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    out, img = run_seam(bed, tmp_path, f"{HEAD}:5999")
    assert "qlustar: multicast: no answer from ql-mcastd" in out, out
    assert "multicast failed, falling back to unicast" in out
    assert time.monotonic() - start < 15
    assert img.read_bytes() == http.read_bytes()


@contextlib.contextmanager
def multicast_blocked(ns: str, work: Path) -> Iterator[None]:
    """A switch that drops multicast, seen from one node: nothing to or from 224.0.0.0/4
    reaches or leaves its namespace (the daemon's TCP control still does)."""
    rules = work / "block-multicast.nft"
    rules.write_text(
        "table inet qlt {\n"
        "  chain i { type filter hook input priority 0; ip daddr 224.0.0.0/4 drop; }\n"
        "  chain o { type filter hook output priority 0; ip daddr 224.0.0.0/4 drop; }\n"
        "}\n"
    )
    sh("ip", "netns", "exec", ns, "nft", "-f", str(rules))
    try:
        yield
    finally:
        sh("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "qlt", check=False)


def test_multicast_blocked_falls_back_to_http(
    bed: Bed, daemon: Daemon, http: Path, tmp_path: Path
) -> None:
    with multicast_blocked(bed.nodes[3], tmp_path):
        out, img = run_seam(bed, tmp_path, f"{HEAD}:5000")
    assert "qlustar: multicast: session 1:" in out, out  # the daemon answered ...
    assert "qlustar: multicast: udp-receiver failed" in out, out  # ... no stream came
    assert "multicast failed, falling back to unicast" in out
    assert img.read_bytes() == http.read_bytes()


def test_mcast_off_forces_unicast(bed: Bed, http: Path, tmp_path: Path) -> None:
    out, img = run_seam(bed, tmp_path, "off")
    assert "qlustar: multicast off (qlustar.mcast=off)" in out and "ql-mcastd" not in out, out
    assert img.read_bytes() == http.read_bytes()
