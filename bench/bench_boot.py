"""Boot-method benchmark: wall time from QEMU start to the runner's end (`qlimage: handing over
to`) and to the kernel's first line, per boot path, side by side (never asserts on time).

  bios-pxelinux/tftp   SeaBIOS + iPXE ROM -> pxelinux.0 -> pxelinux.cfg/<HOSTID>, TFTP
  ipxe/http            SeaBIOS + iPXE ROM -> boot.ipxe -> ipxe/<mac>.ipxe, kernel+initrd by HTTP
  uefi-grub/tftp       OVMF -> shim -> signed GRUB -> grub.cfg-01-<mac>, TFTP
  uefi-sb-grub/tftp    the same with Secure Boot on (Microsoft keys enrolled)
  uefi-grub/http       OVMF -> shim -> signed GRUB -> grub.cfg-01-<mac> over TFTP, then
                       `insmod http` and kernel+initrd from (http,10.0.2.100) (grub_fetch)

Debian's signed GRUB 2.06 connects to port 80 only; its HTTP row runs on a copy of the site
whose beo-01 boot config says `grub_fetch = "http"` with a guest forward of 10.0.2.100:80 to
the boot's own HTTP server (socat), so nothing binds the host's port 80. `grub->kernel` is the
time from GRUB's config banner to the kernel's first line: mostly fetching kernel and initrd.

Run: .venv/bin/python bench/bench_boot.py [--site DIR] [--runs N]   (TCG unless QLIMAGE_ACCEL)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from qlimage.serve import vm  # noqa: E402
from qlimage.site import load_site  # noqa: E402

from helpers import (  # noqa: E402
    GRUB_HTTP_SERVER,
    clone_built_site,
    edit,
    port80_guestfwd,
    qlimage,
    write_site,
)

# (label, firmware, whether beo-01's boot config fetches over HTTP from GRUB)
METHODS = (
    ("bios-pxelinux/tftp", "bios", False),
    ("ipxe/http", "ipxe", False),
    ("uefi-grub/tftp", "uefi", False),
    ("uefi-sb-grub/tftp", "uefi-secure-boot", False),
    ("uefi-grub/http", "uefi", True),
)
COMPUTE = '[bootconfigs.compute]\nimage = "demo"\n'
NAN = float("nan")


def measure(site_root: Path, firmware: str) -> tuple[float, float, float]:
    """(seconds to the kernel's first line, from GRUB's config banner to it, to the runner's
    end) of one boot."""
    site = load_site(site_root)
    start = time.monotonic()
    seen: dict[str, float] = {}

    def on_line(line: str) -> None:
        for key, mark in (("grub", "qlustar: grub config "), ("kernel", "Linux version")):
            if key not in seen and mark in line:
                seen[key] = time.monotonic() - start

    # Port 80 of GRUB_HTTP_SERVER reaches the HTTP server vm.boot runs for this boot.
    result = vm.boot(
        site,
        "beo-01",
        firmware=firmware,
        on_line=on_line,
        guestfwd=[port80_guestfwd(site.http_port)],
    )
    if not result.ok:
        raise SystemExit(f"{firmware}: {result.reason}\n{result.tail(30)}")
    kernel = seen.get("kernel", NAN)
    return kernel, kernel - seen.get("grub", NAN), result.seconds


def http_copy(root: Path, dest: Path) -> Path:
    """A copy of the built site whose beo-01 boot config has GRUB fetch over HTTP."""
    copy = clone_built_site(root, dest)
    extra = f'grub_fetch = "http"\ngrub_http_server = "{GRUB_HTTP_SERVER}"\n'
    edit(copy / "site.toml", COMPUTE, COMPUTE + extra)
    qlimage("-C", str(copy), "build")
    return copy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--site", type=Path, help="a built test site (default: build one)")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-boot.") as tmp:
        root = args.site or write_site(Path(tmp) / "site")
        if args.site is None:
            subprocess.run(
                [sys.executable, "-m", "qlimage", "-C", str(root), "build"],
                cwd=REPO,
                check=True,
                capture_output=True,
            )
        sites = {False: root, True: http_copy(root, Path(tmp) / "http-site")}
        rows: list[tuple[str, float, float, float]] = []
        for label, firmware, http in METHODS:
            runs = [measure(sites[http], firmware) for _ in range(args.runs)]
            k, g, e = (statistics.median(r[i] for r in runs) for i in range(3))
            rows.append((label, k, g, e))
    print(f"accel {vm.accelerator()}, {args.runs} run(s) each, median seconds from QEMU start")
    print(f"{'boot path':<22}{'kernel start':>14}{'grub->kernel':>14}{'runner end':>12}")
    for label, k, g, e in rows:
        grub = f"{g:>14.1f}" if g == g else f"{'-':>14}"  # NaN: no GRUB on this path
        print(f"{label:<22}{k:>14.1f}{grub}{e:>12.1f}")


if __name__ == "__main__":
    main()
