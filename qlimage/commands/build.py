"""`qlimage build [--no-wait] [doit options]`: run the site's doit graph (what changed)."""

from __future__ import annotations

import argparse

from qlimage.site import Site


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("build", help="build what changed (doit run); extra args go to doit")
    s.add_argument("--no-wait", action="store_true", help="fail if another build is running")
    s.add_argument("doit_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=run)


def run(site: Site, args: argparse.Namespace) -> int:
    from qlimage.tasks.run import run_graph

    return run_graph(site, ["run", *args.doit_args], wait=not args.no_wait)
