"""Boot a node of the site in QEMU against bootfiles/: PXE over QEMU's user network, the image
over HTTP from this host, the serial console streamed line by line.

This is the README's main job, the end-to-end tests' boot, and the seed of a boot-test gate.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import ipaddress
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qlimage.errors import QlimageError
from qlimage.layout import Layout
from qlimage.run import PIPE, STDOUT, spawn
from qlimage.site import Host, Site

SUCCESS = (r"qlustar: init\.qlustar started", r"qlustar: handing over to ")
FAILURE = (
    r"qlustar: ERROR",
    r"Kernel panic",
    r"KVM internal error",
    r"PXE-E\w+",
    r"No bootable device",
)


@dataclass
class BootResult:
    ok: bool
    reason: str
    console: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.console[-lines:])


def accelerator() -> str:
    """tcg unless QLIMAGE_ACCEL says otherwise.

    On these machines /dev/kvm opens and even runs a real-mode probe, but pxelinux's protected
    mode code dies with "KVM internal error", so KVM must be asked for explicitly.
    """
    return os.environ.get("QLIMAGE_ACCEL", "tcg")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    overrides: Mapping[str, Path] = {}

    def translate_path(self, path: str) -> str:
        rel = path.split("?", 1)[0].lstrip("/")
        if rel in self.overrides:
            return str(self.overrides[rel])
        return super().translate_path(path)

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(root: Path, port: int, overrides: Mapping[str, Path]) -> http.server.ThreadingHTTPServer:
    """Serve `root` on the loopback address at `port`: QEMU's user network hands the guest's
    connections to the head address to the host's loopback, and nobody else needs to see it."""
    handler = type("Handler", (QuietHandler,), {"overrides": dict(overrides)})
    try:
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", port), functools.partial(handler, directory=str(root))
        )
    except OSError as e:
        raise QlimageError(
            f"cannot serve bootfiles on port {port}: {e.strerror}",
            hint="set head.http_port in site.toml to a free port",
        ) from e
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def qemu_command(site: Site, host: Host, tftpboot: Path, memory: int) -> list[str]:
    net = site.boot_network
    addr = site.boot_address(host)
    if ipaddress.IPv4Address(site.head_address) not in net.cidr:
        raise QlimageError(
            f"site.toml: .head.address: {site.head_address} is outside the boot "
            f"network {net.cidr}, so a VM cannot reach it"
        )
    netdev = (
        f"user,id=n0,net={net.cidr},host={site.head_address},dhcpstart={addr},"
        f"tftp={tftpboot},bootfile=pxelinux.0"
    )
    return [
        "qemu-system-x86_64",
        "-accel",
        accelerator(),
        "-m",
        str(memory),
        "-smp",
        "1",
        "-display",
        "none",
        "-nodefaults",
        "-serial",
        "stdio",
        "-no-reboot",
        "-netdev",
        netdev,
        "-device",
        f"virtio-net-pci,netdev=n0,mac={host.mac}",
        "-boot",
        "n",
    ]


def boot(
    site: Site,
    node: str,
    *,
    timeout: float = 240.0,
    memory: int = 1024,
    success: Iterable[str] = SUCCESS,
    failure: Iterable[str] = FAILURE,
    overrides: Mapping[str, Path] | None = None,
    on_line: Callable[[str], None] | None = None,
    settle: float = 1.0,
) -> BootResult:
    """Boot `node` and watch its console until every success pattern appeared (ok), a failure
    pattern appeared, QEMU exited or `timeout` seconds passed."""
    host = site.host(node)
    layout = Layout(site)
    if not (layout.tftpboot / "pxelinux.0").exists():
        raise QlimageError(f"{layout.tftpboot}: no TFTP tree yet", hint="run `qlimage build` first")
    pending = [re.compile(p) for p in success]
    failing = [re.compile(p) for p in failure]
    command = qemu_command(site, host, layout.tftpboot, memory)
    server = serve(layout.bootfiles, site.http_port, overrides or {})
    start = time.monotonic()
    console: list[str] = []
    result = BootResult(False, f"timed out after {timeout:.0f} s", console)
    # Whatever happens, QEMU is stopped and reaped first, then the HTTP server.
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(server.server_close)
        cleanup.callback(server.shutdown)
        proc = cleanup.enter_context(spawn(command, stdout=PIPE, stderr=STDOUT))
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            # spawn() closes the pipe once QEMU is stopped; the read then ends either way.
            with contextlib.suppress(ValueError, OSError):
                for raw in proc.stdout:
                    lines.put(raw.decode(errors="replace").rstrip("\r\n"))
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        while True:
            left = timeout - (time.monotonic() - start)
            if left <= 0:
                break
            try:
                line = lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                result.reason = f"QEMU exited with status {proc.wait()}"
                break
            line = line.replace("\x1b[2J", "").replace("\x1bc", "")
            console.append(line)
            if on_line:
                on_line(line)
            if bad := next((p for p in failing if p.search(line)), None):
                result.reason = f"console shows {bad.pattern!r}"
                drain(lines, console, on_line, 2.0)
                break
            pending = [p for p in pending if not p.search(line)]
            if not pending:
                result.ok, result.reason = True, "boot reached init.qlustar"
                drain(lines, console, on_line, settle)
                break
    result.seconds = time.monotonic() - start
    return result


def drain(
    lines: queue.Queue[str | None],
    console: list[str],
    on_line: Callable[[str], None] | None,
    seconds: float,
) -> None:
    """Collect what the console prints for a moment more (the lines after a verdict)."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            return
        if line is None:
            return
        console.append(line)
        if on_line:
            on_line(line)
