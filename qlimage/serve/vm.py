"""Boot a node of the site in QEMU against bootfiles/: PXE over QEMU's user network, the image
over HTTP from this host, the serial console streamed line by line.

This is the README's main job, the end-to-end tests' boot, and the seed of a boot-test gate.
With a tap device instead (`tap=`), the node sits on a real (virtual) wire, and the head's own
services answer it: `qlimage serve`'s dnsmasq, nginx and ql-mcastd, on a bridge with the tap.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import ipaddress
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qlimage.errors import QlimageError, ToolMissing
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


# A Linux interface name (at most 15 bytes) that is also safe inside QEMU's comma-separated
# -netdev option.
TAP_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def tap_netdev(tap: str) -> str:
    """QEMU's -netdev for an existing tap device (made by the caller, e.g. `ip tuntap add`, and
    put in the head's bridge): no helper scripts, so QEMU changes nothing on the host."""
    if not TAP_NAME.fullmatch(tap):
        raise QlimageError(
            f"tap device {tap!r}: expected an interface name (letters, digits, . _ -; 15 at most)"
        )
    return f"tap,id=n0,ifname={tap},script=no,downscript=no"


@dataclass(frozen=True)
class Firmware:
    """How QEMU starts a node: SeaBIOS + iPXE ROM running pxelinux, or OVMF (Debian's `ovmf`
    package) running shim -> GRUB with its own virtio-net driver."""

    name: str
    bootfile: str  # what QEMU's DHCP names, as dnsmasq does per client architecture
    code: Path | None = None  # OVMF's read-only code flash
    variables: Path | None = None  # OVMF's variable store template: each boot gets a copy
    machine: str = "pc"
    extra: tuple[str, ...] = ()


OVMF = Path("/usr/share/OVMF")
FIRMWARES = {
    f.name: f
    for f in (
        Firmware("bios", "pxelinux.0"),
        Firmware("ipxe", "boot.ipxe"),  # the NIC's iPXE ROM runs the script itself
        Firmware("uefi", "bootx64.efi", OVMF / "OVMF_CODE_4M.fd", OVMF / "OVMF_VARS_4M.fd", "q35"),
        # Secure Boot: Microsoft's keys enrolled (they sign shim), SMM protects the variables.
        Firmware(
            "uefi-secure-boot",
            "bootx64.efi",
            OVMF / "OVMF_CODE_4M.secboot.fd",
            OVMF / "OVMF_VARS_4M.ms.fd",
            "q35,smm=on",
            ("-global", "driver=cfi.pflash01,property=secure,value=on"),
        ),
    )
}


def firmware_args(fw: Firmware, scratch: Path) -> list[str]:
    """QEMU arguments for `fw`; OVMF's variable store is copied into `scratch` (it is written)."""
    if fw.code is None or fw.variables is None:
        return ["-machine", fw.machine, "-boot", "n"]
    for path in (fw.code, fw.variables):
        if not path.is_file():
            raise ToolMissing(f"{path}: not found", hint="apt-get install ovmf")
    variables = scratch / fw.variables.name
    shutil.copyfile(fw.variables, variables)
    return [
        "-machine",
        fw.machine,
        *fw.extra,
        "-drive",
        f"if=pflash,format=raw,unit=0,readonly=on,file={fw.code}",
        "-drive",
        f"if=pflash,format=raw,unit=1,file={variables}",
        # The NIC first (bootindex) and no IPv6 PXE: OVMF would otherwise spend about 60 s on
        # each boot option that fails before it tries IPv4 PXE.
        "-fw_cfg",
        "name=opt/org.tianocore/IPv6PXESupport,string=n",
    ]


def nic_device(fw: Firmware, host: Host) -> str:
    if fw.code is None:
        return f"virtio-net-pci,netdev=n0,mac={host.mac}"
    # romfile= : no iPXE option ROM, so OVMF boots with its own virtio-net driver.
    return f"virtio-net-pci,netdev=n0,mac={host.mac},romfile=,bootindex=1"


def qemu_command(
    site: Site,
    host: Host,
    tftpboot: Path,
    memory: int,
    fw: Firmware,
    scratch: Path,
    hostfwd: Iterable[str] = (),
    tap: str | None = None,
    guestfwd: Iterable[str] = (),
) -> list[str]:
    net = site.boot_network
    addr = site.boot_address(host)
    if ipaddress.IPv4Address(site.head_address) not in net.cidr:
        raise QlimageError(
            f"site.toml: .head.address: {site.head_address} is outside the boot "
            f"network {net.cidr}, so a VM cannot reach it"
        )
    hostfwd, guestfwd = list(hostfwd), list(guestfwd)
    if tap is not None:
        if hostfwd or guestfwd:
            raise QlimageError("port forwards need QEMU's user network, not a tap device")
        netdev = tap_netdev(tap)
    else:
        netdev = (
            f"user,id=n0,net={net.cidr},host={site.head_address},dhcpstart={addr},"
            f"tftp={tftpboot},bootfile={fw.bootfile}"
        )
        # Port forwards into the node (QEMU's syntax, e.g. tcp:127.0.0.1:2222-:22): how the
        # host reaches a service the node runs, such as sshd, without tap devices or root.
        netdev += "".join(f",hostfwd={rule}" for rule in hostfwd)
        # Guest forwards (e.g. tcp:10.0.2.100:80-cmd:socat - TCP:127.0.0.1:8470): a private
        # address of the user network whose port reaches a program on the host, such as the
        # port 80 that GRUB's http module insists on, without binding port 80 here.
        netdev += "".join(f",guestfwd={rule}" for rule in guestfwd)
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
        nic_device(fw, host),
        *firmware_args(fw, scratch),
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
    firmware: str = "bios",
    hostfwd: Iterable[str] = (),
    devices: Iterable[str] = (),
    while_up: Callable[[], None] | None = None,
    tap: str | None = None,
    guestfwd: Iterable[str] = (),
) -> BootResult:
    """Boot `node` with `firmware` (a FIRMWARES name) and watch its console until every
    success pattern appeared (ok), a failure pattern appeared, QEMU exited or `timeout`
    seconds passed. `hostfwd`: QEMU port forwards into the node; `devices`: more QEMU
    arguments (a second NIC...); `while_up`: called once the boot succeeded, with the node
    still running (to reach it over a forwarded port), before QEMU is stopped.
    `tap`: an existing tap device for the NIC instead of QEMU's user network; whatever is on
    its wire (`qlimage serve` on the head's bridge) answers DHCP, TFTP and HTTP, so no HTTP
    server is started here and `overrides` cannot apply. `guestfwd`: QEMU guest forwards, an
    address:port of the user network to a command or socket on this host."""
    if tap is not None:
        tap_netdev(tap)  # a bad name is refused before anything starts
        if overrides:
            raise QlimageError("overrides are served on QEMU's user network only, not on a tap")
    host = site.host(node)
    layout = Layout(site)
    fw = FIRMWARES[firmware]
    if not (layout.tftpboot / fw.bootfile).exists():
        raise QlimageError(
            f"{layout.tftpboot}: no {fw.bootfile} yet", hint="run `qlimage build` first"
        )
    pending = [re.compile(p) for p in success]
    failing = [re.compile(p) for p in failure]
    scratch = Path(tempfile.mkdtemp(prefix="qlimage-vm."))
    try:
        command = qemu_command(
            site, host, layout.tftpboot, memory, fw, scratch, hostfwd, tap, guestfwd=guestfwd
        )
        command += list(devices)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    server = None if tap is not None else serve(layout.bootfiles, site.http_port, overrides or {})
    start = time.monotonic()
    console: list[str] = []
    result = BootResult(False, f"timed out after {timeout:.0f} s", console)
    # Whatever happens, QEMU is stopped and reaped first, then the HTTP server.
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        if server is not None:
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
                if while_up:
                    while_up()
                    drain(lines, console, on_line, 0.5)  # what the node printed meanwhile
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
