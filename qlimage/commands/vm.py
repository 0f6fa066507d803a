"""`qlimage vm NODE`: PXE-boot a node of the site in QEMU and stream its console."""

from __future__ import annotations

import argparse
import sys

from qlimage.errors import ConfigError
from qlimage.site import Site


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("vm", help="PXE-boot a node of the site in QEMU and stream its console")
    s.add_argument("node")
    s.add_argument("--timeout", type=float, default=240.0, help="seconds (default 240)")
    s.add_argument("--memory", type=int, default=1024, help="MiB of guest memory")
    s.add_argument("--quiet", action="store_true", help="print the console only on failure")
    s.add_argument(
        "--uefi",
        action="store_true",
        help="boot with OVMF through shim and GRUB (grubx64.efi, grub/) instead of pxelinux",
    )
    s.add_argument(
        "--ipxe",
        action="store_true",
        help="BIOS with the NIC's iPXE running boot.ipxe (kernel and initrd over HTTP)",
    )
    s.add_argument(
        "--secure-boot",
        action="store_true",
        help="with --uefi: Secure Boot on, Microsoft's keys enrolled",
    )
    s.add_argument(
        "--tap",
        metavar="IFNAME",
        help="attach the NIC to this existing tap device (e.g. in the bridge `qlimage serve` "
        "answers on) instead of QEMU's user network: the head's dnsmasq, nginx and "
        "ql-mcastd boot the node",
    )
    s.set_defaults(func=run)


def show(line: str) -> None:
    print(line, flush=True)


def run(site: Site, args: argparse.Namespace) -> int:
    from qlimage.serve import vm

    if args.secure_boot and not args.uefi:
        raise ConfigError(["qlimage vm: --secure-boot needs --uefi"])
    if args.ipxe and args.uefi:
        raise ConfigError(["qlimage vm: --ipxe and --uefi exclude each other"])
    if args.ipxe and args.tap:
        # On a real wire the head's dnsmasq names the boot file, by the host's boot config.
        raise ConfigError(["qlimage vm: --ipxe applies to QEMU's user network, not to --tap"])
    firmware = "uefi-secure-boot" if args.secure_boot else "uefi" if args.uefi else "bios"
    firmware = "ipxe" if args.ipxe else firmware
    result = vm.boot(
        site,
        args.node,
        timeout=args.timeout,
        memory=args.memory,
        on_line=None if args.quiet else show,
        firmware=firmware,
        tap=args.tap,
    )
    verdict = "ok" if result.ok else "FAILED"
    print(
        f"qlimage vm {args.node}: {verdict}: {result.reason} ({result.seconds:.1f} s, "
        f"accel {vm.accelerator()}, firmware {firmware}"
        f"{f', tap {args.tap}' if args.tap else ''})",
        file=sys.stderr,
    )
    if not result.ok:
        if args.quiet:
            print(result.tail(), file=sys.stderr)
        return 1
    return 0
