"""`qlimage repro-check`: build the site twice from scratch, differently, and compare."""

from __future__ import annotations

import argparse

from qlimage.site import Site


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser(
        "repro-check",
        help="build the site twice from scratch, differently, and compare every output",
    )
    s.add_argument(
        "--keep", action="store_true", help="keep both build trees and logs and print where"
    )
    s.add_argument(
        "--diffoscope",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show diffoscope's report for each differing file (default: when installed)",
    )
    s.set_defaults(func=run)


def flushed(line: str) -> None:
    print(line, flush=True)


def run(site: Site, args: argparse.Namespace) -> int:
    from qlimage.tasks.repro import repro_check

    return repro_check(site.paths.root, keep=args.keep, diffoscope=args.diffoscope, out=flushed)
