"""`qlimage status`: each image's published generation, checksum, size and modules, whether it
is hand-edited or due for a rebuild (and why), and which generation each node last fetched."""

from __future__ import annotations

import argparse
import json

from qlimage.site import Site


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser(
        "status",
        help="images, boot generation, pending rebuilds and the generation each node last fetched",
        description="Reads only: never waits for a running build. A node is STALE when the "
        "generation it last fetched (from the head's access log) is not its image's current one.",
    )
    s.add_argument("--json", action="store_true", help="print the status as one JSON object")
    s.add_argument("--image", metavar="IMAGE", help="only this image and the nodes booting it")
    s.add_argument("--stale", action="store_true", help="list only the nodes that are stale")
    s.set_defaults(func=run)


def run(site: Site, args: argparse.Namespace) -> int:
    from qlimage.admin.status import render_table, site_status

    status = site_status(site, image=args.image, stale_only=args.stale)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(render_table(status), end="")
    return 0
