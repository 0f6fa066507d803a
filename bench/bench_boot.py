"""Boot-method benchmark: wall time from QEMU start to the runner's end (`qlimage: handing over
to`) and to the kernel's first line, per boot path, side by side (never asserts on time).

  bios-pxelinux/tftp   SeaBIOS + iPXE ROM -> pxelinux.0 -> pxelinux.cfg/<HOSTID>, TFTP
  ipxe/http            SeaBIOS + iPXE ROM -> boot.ipxe -> ipxe/<mac>.ipxe, kernel+initrd by HTTP
  uefi-grub/tftp       OVMF -> shim -> signed GRUB -> grub.cfg-01-<mac>, TFTP
  uefi-sb-grub/tftp    the same with Secure Boot on (Microsoft keys enrolled)

UEFI GRUB/HTTP is not measured: Debian's signed GRUB 2.06 takes `(http,<server>)` only on
port 80 (`(http,host:port)` is "disk not found") and its config prefix is TFTP-bound.

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

from helpers import write_site  # noqa: E402

METHODS = (
    ("bios-pxelinux/tftp", "bios"),
    ("ipxe/http", "ipxe"),
    ("uefi-grub/tftp", "uefi"),
    ("uefi-sb-grub/tftp", "uefi-secure-boot"),
)


def measure(site_root: Path, firmware: str) -> tuple[float, float]:
    """(seconds to the kernel's first line, seconds to the runner's end) of one boot."""
    start = time.monotonic()
    kernel: list[float] = []

    def on_line(line: str) -> None:
        if not kernel and "Linux version" in line:
            kernel.append(time.monotonic() - start)

    result = vm.boot(load_site(site_root), "beo-01", firmware=firmware, on_line=on_line)
    if not result.ok:
        raise SystemExit(f"{firmware}: {result.reason}\n{result.tail(30)}")
    return (kernel[0] if kernel else float("nan")), result.seconds


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
        rows = []
        for label, firmware in METHODS:
            runs = [measure(root, firmware) for _ in range(args.runs)]
            rows.append(
                (
                    label,
                    statistics.median(k for k, _ in runs),
                    statistics.median(e for _, e in runs),
                )
            )
    print(f"accel {vm.accelerator()}, {args.runs} run(s) each, median seconds from QEMU start")
    print(f"{'boot path':<22}{'kernel start':>14}{'runner end':>12}")
    for label, k, e in rows:
        print(f"{label:<22}{k:>14.1f}{e:>12.1f}")


if __name__ == "__main__":
    main()
