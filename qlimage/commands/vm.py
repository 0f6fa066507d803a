"""`qlimage vm NODE`: PXE-boot a node of the site in QEMU and stream its console."""

from __future__ import annotations

import argparse
import sys

from qlimage.site import Site


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("vm", help="PXE-boot a node of the site in QEMU and stream its console")
    s.add_argument("node")
    s.add_argument("--timeout", type=float, default=240.0, help="seconds (default 240)")
    s.add_argument("--memory", type=int, default=1024, help="MiB of guest memory")
    s.add_argument("--quiet", action="store_true", help="print the console only on failure")
    s.set_defaults(func=run)


def show(line: str) -> None:
    print(line, flush=True)


def run(site: Site, args: argparse.Namespace) -> int:
    from qlimage.serve import vm

    result = vm.boot(
        site,
        args.node,
        timeout=args.timeout,
        memory=args.memory,
        on_line=None if args.quiet else show,
    )
    verdict = "ok" if result.ok else "FAILED"
    print(
        f"qlimage vm {args.node}: {verdict}: {result.reason} ({result.seconds:.1f} s, "
        f"accel {vm.accelerator()})",
        file=sys.stderr,
    )
    if not result.ok:
        if args.quiet:
            print(result.tail(), file=sys.stderr)
        return 1
    return 0
