"""`qlimage doit ...`: any doit command on the site's graph (list, info, forget...)."""

from __future__ import annotations

import argparse

from qlimage.site import Site


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("doit", help="any doit command on the site's graph (list, info, forget...)")
    s.add_argument("doit_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=run)


def run(site: Site, args: argparse.Namespace) -> int:
    from qlimage.tasks.run import run_graph

    return run_graph(site, args.doit_args)
