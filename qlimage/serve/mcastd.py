"""ql-mcastd: multicast image delivery with udpcast, one stream per generation and join window.

A node asks over a line protocol on TCP (busybox-static's `nc` in the initrd speaks TCP only;
the handshake also means the asking address is not forged):

    GET <image> <generation>\\n  ->  OK <group> <port> <session> <start-delay-ms> <bytes>\\n
                                  ->  NO <reason>\\n

(<bytes>: the image's size, which the client shows its progress against.)

Every node asking for the same (image, generation) within the join window gets the same session;
when the window closes the daemon starts one `udp-sender` for it (udpcast does the reliable
multicast: NACKs, retransmissions, dropping dead receivers) that waits for as many receivers as
asked, and at most `max-wait` seconds after the first one. A later asker opens a new session on
the next free group and port pair. Only a generation published below the images tree (a real
directory naming itself in its `generation` file) is ever sent, and only to the nodes and admin
networks nginx also serves. Every session is bounded: a sender nobody joins ends after its start
timeout, a running one is killed at a deadline derived from the image size and the rate limit.

The daemon reads its settings from the JSON file the build writes (head/mcastd.json) and logs
to stderr: while a session sends, a progress line every 10 % or 5 s (bytes sent of the image's,
receivers connected of those that asked, from udp-sender's own statistics), then one line per
session: image, generation, group, port, receivers, bytes, seconds, retransmissions, status.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import os
import re
import selectors
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from qlimage import contract, run
from qlimage.errors import QlimageError
from qlimage.layout import Layout
from qlimage.progress import Progress
from qlimage.site import Site

CONFIG = "mcastd.json"  # below bootfiles/head/
CONFIG_FORMAT = 1
MAX_LINE = 256  # bytes of a request, newline included
CONNECTION_TIMEOUT = 3.0  # seconds a client has to send its line
MAX_CONNECTIONS = 1024  # open control connections; more wait in the listen backlog
START_TIMEOUT_SLACK = 10  # seconds a sender waits for its first receiver beyond the window
RETRIES_UNTIL_DROP = 30  # udp-sender: retransmission rounds before a silent receiver is dropped
# Receivers start before their sender (they wait out the join window listening), so their
# first connect request reaches nobody and each depends on the HELLO udp-sender sends once when
# it starts: one lost HELLO leaves that node out after max-wait. Repeating it while receivers
# join costs a few packets a second.
REXMIT_HELLO_MS = 500
# udpcast's default (half duplex) sends a slice only once every receiver acknowledged the one
# before, and shrinks slices on any loss: each slice costs an acknowledgement round trip through
# every receiver, which grows with N. Full duplex keeps the next slice on the wire during that
# round (a switched boot network is full duplex), and fixed slices of udpcast's default maximum
# (1024 blocks, 1.4 MB) keep the rounds few. bench/bench_mcast.py, 200 MB over 200 Mbit/s, N=32 on
# 2 loaded cores: 36.7 s -> 29.7 s per session, sender CPU 14.9 s -> 11.3 s.
SLICE_BLOCKS = 1024
DEADLINE_FACTOR = 4  # a running session may take this many times its size at the rate limit
DEADLINE_SLACK = 60.0  # ... plus this many seconds
TICK = 0.2  # seconds between looks at the senders
IMAGE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # the site schema's name
GENERATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # never hidden, never a path
RATE = re.compile(r"([1-9][0-9]{0,5})([kmg]?)")
RETRANSMITS = re.compile(rb"re-xmits=\s*([0-9]+)")
# udp-sender's statistics record, every --stat-period (default 0.5 s), ended by \r:
# `bytes= 13 418 496  re-xmits=0000000 (  0.0%) slice=1024 -   0`; and its receiver events.
SENT = re.compile(rb"bytes=\s*([0-9][0-9 ]*)\s+re-xmits=")
JOINED = b"New connection from "
DROPPED = b"Dropping client #"
READ_CHUNK = 65536


class Refused(Exception):
    """A request the daemon answers with `NO <reason>`."""


# --- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    address: str  # control address; also the interface the senders send from
    port: int
    images: Path  # bootfiles/qlustar/images
    group_base: str
    groups: int
    data_port_first: int
    data_port_last: int
    window: float
    max_bitrate: str
    clients: tuple[str, ...]  # CIDRs that may ask

    @property
    def slots(self) -> int:
        """How many sessions can run at once: one group and one port pair each."""
        return min(self.groups, (self.data_port_last - self.data_port_first + 1) // 2)

    def group(self, slot: int) -> str:
        return str(ipaddress.IPv4Address(self.group_base) + slot)

    def portbase(self, slot: int) -> int:
        return self.data_port_first + 2 * slot

    def allows(self, peer: str) -> bool:
        try:
            addr = ipaddress.IPv4Address(peer)
        except ValueError:
            return False
        return any(addr in ipaddress.IPv4Network(c) for c in self.clients)


def config_path(site: Site) -> Path:
    return Layout(site).head / CONFIG


def render(site: Site) -> str:
    """head/mcastd.json: JSON (json.dumps escapes every value), sorted for reproducible bytes."""
    from qlimage.serve import nginx  # who may fetch over HTTP may ask for multicast

    return render_for(site, [cidr for cidr, _ in nginx.client_rows(site)])


def render_for(site: Site, clients: list[str]) -> str:
    """render() with the CIDRs of nginx.client_rows(site) the caller already has."""
    mc = site.multicast
    data = {
        "format": CONFIG_FORMAT,
        "site": site.name,
        "address": mc.address,
        "port": mc.port,
        "images": str(Layout(site).qlustar / contract.IMAGES_DIR),
        "group_base": mc.group_base,
        "groups": mc.groups,
        "data_port_first": mc.data_port_first,
        "data_port_last": mc.data_port_last,
        "window": mc.window,
        "max_bitrate": mc.max_bitrate,
        "clients": [],  # CLIENTS_SLOT, filled below
    }
    text = json.dumps(data, indent=2, sort_keys=True)
    return text.replace(CLIENTS_SLOT, f'"clients": {indented_strings(clients)}', 1) + "\n"


# json.dumps escapes every `"` inside a string, so this text can only be the key itself.
CLIENTS_SLOT = '"clients": []'


def indented_strings(items: list[str]) -> str:
    """json.dumps(items, indent=2) for a list of strings one level deep, by the C encoder:
    with `indent` json.dumps runs its Python encoder, a third of the whole config's cost at
    10,000 nodes; its item separator can carry the newline and the indentation instead."""
    if not items:
        return "[]"
    return "[\n    " + json.dumps(items, separators=(",\n    ", ": "))[1:-1] + "\n  ]"


def load_config(path: Path) -> Config:
    """The generated settings, checked field by field: one line naming the file and field."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise QlimageError(f"{path}: cannot read ({e})", hint="run qlimage build") from None

    def field_(key: str, kind: type, check: Callable[[Any], bool], expected: str) -> Any:
        value = raw.get(key) if isinstance(raw, dict) else None
        if type(value) is not kind and not (kind is float and type(value) is int):
            value = None
        if value is None or not check(value):
            raise QlimageError(f"{path}: {key}: {value!r}: expected {expected}")
        return kind(value)

    def is_ipv4(v: str) -> bool:
        try:
            ipaddress.IPv4Address(v)
        except ValueError:
            return False
        return True

    def is_cidrs(v: list[Any]) -> bool:
        try:
            return all(isinstance(c, str) and ipaddress.IPv4Network(c) for c in v)
        except ValueError:
            return False

    field_("format", int, lambda v: v == CONFIG_FORMAT, f"{CONFIG_FORMAT}")
    first = field_("data_port_first", int, lambda v: 1 <= v <= 65534, "a port")
    return Config(
        address=field_("address", str, is_ipv4, "an IPv4 address"),
        port=field_("port", int, lambda v: 1 <= v <= 65535, "a port"),
        images=Path(field_("images", str, lambda v: v.startswith("/"), "an absolute path")),
        group_base=field_(
            "group_base",
            str,
            lambda v: is_ipv4(v) and ipaddress.IPv4Address(v).is_multicast,
            "an IPv4 multicast address",
        ),
        groups=field_("groups", int, lambda v: 1 <= v <= 65536, "1 to 65536"),
        data_port_first=first,
        data_port_last=field_("data_port_last", int, lambda v: first < v <= 65535, "a port"),
        window=field_("window", float, lambda v: 0 < v <= 300, "0 to 300 seconds"),
        max_bitrate=field_(
            "max_bitrate", str, lambda v: bool(RATE.fullmatch(v)), "a bit rate such as 600m"
        ),
        clients=tuple(field_("clients", list, is_cidrs, "a list of IPv4 networks")),
    )


def rate_bits(rate: str) -> int:
    m = RATE.fullmatch(rate)
    assert m is not None  # checked when the config was loaded
    return int(m[1]) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m[2]]


# --- the control protocol ---------------------------------------------------------------------


def parse_request(data: bytes) -> tuple[str, str]:
    """`GET <image> <generation>\\n` -> (image, generation); anything else is Refused."""
    if len(data) > MAX_LINE:
        raise Refused("request too long")
    try:
        line = data.decode("ascii")
    except UnicodeDecodeError:
        raise Refused("request not ASCII") from None
    line = line.removesuffix("\n").removesuffix("\r")
    fields = line.split(" ")
    if len(fields) != 3 or fields[0] != "GET":
        raise Refused("expected: GET <image> <generation>")
    image, generation = fields[1], fields[2]
    if not IMAGE_NAME.fullmatch(image):
        raise Refused("bad image name")
    if not GENERATION_NAME.fullmatch(generation):
        raise Refused("bad generation name")
    return image, generation


def published_image(config: Config, image: str, generation: str) -> Path:
    """The image file of a published generation; never a path through a link out of the tree."""
    root = config.images / image
    gen = root / generation
    img = gen / contract.image_file(image)
    try:
        real = (
            root.is_dir()
            and not root.is_symlink()
            and gen.is_dir()
            and not gen.is_symlink()
            and (gen / contract.GENERATION).read_text() == generation + "\n"
            and img.is_file()
            and not img.is_symlink()
        )
    except OSError:
        real = False
    if not real:
        raise Refused(f"no published generation {generation} of image {image}")
    return img


# --- sessions ---------------------------------------------------------------------------------


class SenderOutput:
    """What udp-sender has said so far, read as it comes: bytes sent, receivers joined and
    dropped. Records end in \\r (the statistics) or \\n (events); a cut one waits for its end."""

    def __init__(self) -> None:
        self.pending = b""
        self.read = 0  # bytes of output consumed
        self.sent = 0
        self.joined = 0
        self.dropped = 0

    def feed(self, chunk: bytes) -> None:
        self.read += len(chunk)
        *records, self.pending = (self.pending + chunk).replace(b"\r", b"\n").split(b"\n")
        for record in records:
            if sent := SENT.search(record):
                self.sent = int(sent[1].replace(b" ", b""))
            elif record.startswith(JOINED):
                self.joined += 1
            elif record.startswith(DROPPED):
                self.dropped += 1

    @property
    def receivers(self) -> int:
        return self.joined - self.dropped


@dataclass
class Session:
    id: int
    image: str
    generation: str
    path: Path
    slot: int
    group: str
    port: int
    closes: float  # clock time the join window ends and the sender starts
    peers: set[str] = field(default_factory=set)
    started: float | None = None
    deadline: float | None = None
    stack: ExitStack = field(default_factory=ExitStack)
    proc: Any = None  # subprocess.Popen[bytes] once started
    output: IO[bytes] | None = None
    size: int = 0  # bytes of the image (a published one never changes)
    stats: SenderOutput = field(default_factory=SenderOutput)
    shown: Progress | None = None  # the progress lines, from the first bytes sent


class Scheduler:
    """Which session an asker joins, and which group and port a new one gets. No I/O besides
    checking the published tree; `clock` is injected so the window logic is tested exactly."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.sessions: dict[int, Session] = {}
        self.next_id = 1
        self.next_slot = 0

    def answer(self, data: bytes, peer: str) -> str:
        """The reply line (without newline) to one request from `peer`."""
        try:
            if not self.config.allows(peer):
                raise Refused(f"{peer} is not a registered node")
            image, generation = parse_request(data)
            s = self.join(image, generation, peer)
        except Refused as e:
            return f"NO {e}"
        delay = max(0, math.ceil((s.closes - self.clock()) * 1000))
        return f"OK {s.group} {s.port} {s.id} {delay} {s.size}"

    def join(self, image: str, generation: str, peer: str) -> Session:
        path = published_image(self.config, image, generation)
        now = self.clock()
        for s in self.sessions.values():
            same = (s.image, s.generation) == (image, generation)
            if same and s.started is None and now < s.closes:
                s.peers.add(peer)
                return s
        s = self.open(image, generation, path, now)
        s.peers.add(peer)
        return s

    def open(self, image: str, generation: str, path: Path, now: float) -> Session:
        busy = {s.slot for s in self.sessions.values()}
        slots = self.config.slots
        # Round robin: a group a late receiver of the last session still listens on is not
        # handed out again at once.
        for i in range(slots):
            slot = (self.next_slot + i) % slots
            if slot not in busy:
                break
        else:
            raise Refused(f"all {slots} multicast sessions busy")
        self.next_slot = (slot + 1) % slots
        try:
            size = path.stat().st_size
        except OSError:
            raise Refused(f"no published generation {generation} of image {image}") from None
        s = Session(
            self.next_id,
            image,
            generation,
            path,
            slot,
            self.config.group(slot),
            self.config.portbase(slot),
            now + self.config.window,
            size=size,
        )
        self.next_id += 1
        self.sessions[s.id] = s
        return s

    def due(self) -> list[Session]:
        """Sessions whose join window has closed and whose sender has not started."""
        now = self.clock()
        return [s for s in self.sessions.values() if s.started is None and now >= s.closes]

    def end(self, session: Session) -> None:
        self.sessions.pop(session.id, None)

    def next_event(self) -> float | None:
        """Seconds until the next window closes, if a session waits for one."""
        waiting = [s.closes for s in self.sessions.values() if s.started is None]
        return max(0.0, min(waiting) - self.clock()) if waiting else None


# --- udp-sender -------------------------------------------------------------------------------


def sender_args(config: Config, s: Session) -> list[str]:
    """One udpcast transmission: it starts when all `peers` joined, or `max-wait` seconds after
    the first did; it gives up when nobody joins within the start timeout."""
    wait = max(1, math.ceil(config.window))
    return [
        "udp-sender",
        "--file",
        str(s.path),
        "--interface",
        config.address,
        "--mcast-rdv-address",
        s.group,
        "--mcast-data-address",
        s.group,
        "--portbase",
        str(s.port),
        "--min-receivers",
        str(len(s.peers)),
        "--max-wait",
        str(wait),
        "--start-timeout",
        str(wait + START_TIMEOUT_SLACK),
        "--retries-until-drop",
        str(RETRIES_UNTIL_DROP),
        "--rexmit-hello-interval",
        str(REXMIT_HELLO_MS),
        "--full-duplex",
        "--slice-size",
        str(SLICE_BLOCKS),
        "--max-bitrate",
        config.max_bitrate,
        "--nokbd",
    ]


def session_deadline(config: Config, s: Session, size: int) -> float:
    seconds = size * 8 / rate_bits(config.max_bitrate) * DEADLINE_FACTOR
    return math.ceil(config.window) + START_TIMEOUT_SLACK + seconds + DEADLINE_SLACK


def log_line(s: Session, status: str, size: int, seconds: float, retransmits: str) -> str:
    return (
        f"ql-mcastd: session {s.id} image {s.image} generation {s.generation}"
        f" group {s.group} port {s.port} receivers {len(s.peers)} bytes {size}"
        f" seconds {seconds:.1f} retransmits {retransmits} status {status}"
    )


class Daemon:
    def __init__(
        self,
        config: Config,
        log: IO[str] = sys.stderr,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        self.scheduler = Scheduler(config, clock)
        self.log = log

    def start(self, s: Session) -> None:
        now = self.clock()
        s.started = now
        try:
            size = s.size = s.path.stat().st_size
            s.output = s.stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 (closed by the stack)
            s.proc = s.stack.enter_context(
                run.spawn(sender_args(self.config, s), stdout=s.output, stderr=run.STDOUT)
            )
        except (OSError, QlimageError) as e:
            self.finish(s, f"not started ({e})")
            return
        s.deadline = now + session_deadline(self.config, s, size)

    def reap(self) -> None:
        for s in list(self.scheduler.sessions.values()):
            if s.proc is None:
                continue
            if s.proc.poll() is not None:
                code = s.proc.returncode
                self.finish(s, "ok" if code == 0 else f"udp-sender status {code}")
            elif s.deadline is not None and self.clock() > s.deadline:
                self.finish(s, "killed at its deadline")

    def report(self, s: Session) -> None:
        """Read what the sender said since the last look; once it sends, a progress line every
        10 % or 5 s (qlimage.progress' plain lines: the log is no terminal, and is shared)."""
        if s.output is None:
            return
        # pread: the sender writes through the same open file, whose offset must stay its own.
        while chunk := os.pread(s.output.fileno(), READ_CHUNK, s.stats.read):
            s.stats.feed(chunk)
        if s.stats.sent and s.shown is None:
            s.shown = Progress(
                f"sending session {s.id} ({s.image} {s.generation})",
                s.size,
                as_bytes=True,
                stream=self.log,
                clock=self.clock,
                prefix="ql-mcastd",
                live=False,
            )
        if s.shown is not None:
            s.shown.update(s.stats.sent, f"{s.stats.receivers} of {len(s.peers)} receivers")

    def finish(self, s: Session, status: str) -> None:
        self.report(s)
        # The 100 % line, unless the last one said it. udp-sender ends "ok" when it dropped its
        # last receiver too: a transfer that stopped short keeps the lines it had.
        if s.shown is not None and s.stats.sent >= s.size:
            s.shown.finish()
        retransmits = "?"
        if s.output is not None:
            s.output.seek(0)
            found = RETRANSMITS.findall(s.output.read())
            retransmits = found[-1].decode().lstrip("0") or "0" if found else "?"
        try:
            size = s.path.stat().st_size
        except OSError:
            size = 0
        seconds = self.clock() - (s.started or self.clock())
        s.stack.close()  # stops the sender if it still runs, and reaps it
        self.scheduler.end(s)
        print(log_line(s, status, size, seconds, retransmits), file=self.log, flush=True)

    def tick(self) -> None:
        for s in self.scheduler.due():
            self.start(s)
        self.reap()
        for s in self.scheduler.sessions.values():
            self.report(s)

    def stop_all(self) -> None:
        for s in list(self.scheduler.sessions.values()):
            if s.proc is not None:
                self.finish(s, "stopped")


# --- the control socket -----------------------------------------------------------------------


@dataclass
class Connection:
    sock: socket.socket
    peer: str
    deadline: float
    data: bytes = b""


def listen(config: Config) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.address, config.port))
    except OSError as e:
        sock.close()
        raise QlimageError(
            f"ql-mcastd: {config.address}:{config.port} cannot be bound ({e.strerror})",
            hint="stop the other server or set multicast.port in site.toml",
        ) from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


class Server:
    """Non-blocking: a slow or silent client never holds up another one."""

    def __init__(self, daemon: Daemon, sock: socket.socket) -> None:
        self.daemon = daemon
        self.sock = sock
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ)
        self.conns: dict[int, Connection] = {}

    def accept(self) -> None:
        while len(self.conns) < MAX_CONNECTIONS:
            try:
                conn, (peer, _port) = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            c = Connection(conn, peer, time.monotonic() + CONNECTION_TIMEOUT)
            self.conns[conn.fileno()] = c
            self.selector.register(conn, selectors.EVENT_READ)

    def read(self, c: Connection) -> None:
        try:
            chunk = c.sock.recv(MAX_LINE + 1 - len(c.data))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        c.data += chunk
        if b"\n" in c.data:
            self.reply(c, self.daemon.scheduler.answer(c.data[: c.data.index(b"\n") + 1], c.peer))
        elif len(c.data) > MAX_LINE:
            self.reply(c, "NO request too long")
        elif not chunk:
            self.close(c)

    def reply(self, c: Connection, line: str) -> None:
        with contextlib.suppress(OSError):
            c.sock.send((line + "\n").encode())  # a few bytes: fits any socket buffer
        self.close(c)

    def close(self, c: Connection) -> None:
        self.selector.unregister(c.sock)
        self.conns.pop(c.sock.fileno(), None)
        c.sock.close()

    def expire(self) -> None:
        now = time.monotonic()
        for c in [c for c in self.conns.values() if now > c.deadline]:
            self.reply(c, "NO timeout")

    def step(self) -> None:
        wait = self.daemon.scheduler.next_event()
        timeout = TICK if wait is None else min(TICK, wait)
        for key, _ in self.selector.select(timeout):
            if key.fileobj is self.sock:
                self.accept()
            else:
                c = self.conns.get(key.fd)
                if c is not None:
                    self.read(c)
        self.expire()
        self.daemon.tick()

    def close_all(self) -> None:
        for c in list(self.conns.values()):
            self.close(c)
        self.selector.close()
        self.sock.close()


def serve(config: Config, until: Callable[[], bool] | None = None) -> None:
    daemon = Daemon(config)
    server = Server(daemon, listen(config))
    print(
        f"ql-mcastd: listening on {config.address}:{config.port}, {config.slots} sessions,"
        f" window {config.window:g} s",
        file=sys.stderr,
        flush=True,
    )
    try:
        with run.sigterm_stops():
            while until is None or not until():
                server.step()
    except (KeyboardInterrupt, run.Stopped):
        pass
    finally:
        daemon.stop_all()
        server.close_all()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ql-mcastd", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, type=Path, help="head/mcastd.json of the site")
    args = p.parse_args(argv)
    try:
        serve(load_config(args.config))
    except QlimageError as e:
        print(f"ql-mcastd: {e}" if not str(e).startswith("ql-mcastd") else e, file=sys.stderr)
        return e.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
