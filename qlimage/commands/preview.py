"""`qlimage preview NODE [--previous bundle.json]`: every file and action the node receives."""

from __future__ import annotations

import argparse

from qlimage.site import Site


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("preview", help="every file and action a node receives (or the diff)")
    s.add_argument("node")
    s.add_argument("--previous", metavar="BUNDLE", help="a previous bundle.json to diff against")
    s.set_defaults(func=run)


def run(site: Site, args: argparse.Namespace) -> int:
    from qlimage.bundle import render as bundle

    new = bundle.render_bundle(site, site.host(args.node))
    if args.previous is None:
        print(bundle.describe(new), end="")
    else:
        print(bundle.diff_file(args.previous, new) or "no change")
    return 0
