"""`qlimage serve`: run the head's DHCP/TFTP (dnsmasq), HTTP (nginx) and multicast image
delivery (ql-mcastd) for the site."""

from __future__ import annotations

import argparse
import sys

from qlimage.site import Site


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser(
        "serve",
        help="run dnsmasq (DHCP, TFTP), nginx (HTTP) and ql-mcastd (multicast) for the site "
        "until Ctrl-C",
    )
    what = s.add_mutually_exclusive_group()
    what.add_argument(
        "--check", action="store_true", help="test the built configs (dnsmasq --test, nginx -t)"
    )
    what.add_argument(
        "--print-config", action="store_true", help="print the configs the build writes"
    )
    s.set_defaults(func=run)


def run(site: Site, args: argparse.Namespace) -> int:
    from qlimage.serve import head

    if args.print_config:
        print(head.describe(site), end="")
        return 0
    if args.check:
        for done in head.check(site):
            print(f"qlimage serve: {done}: ok")
        return 0

    daemons = "dnsmasq, nginx and ql-mcastd" if site.multicast.enabled else "dnsmasq and nginx"

    def ready() -> None:
        print(
            f"qlimage serve: {daemons} running for {site.name} "
            f"(HTTP {site.http_base}); Ctrl-C stops them",
            file=sys.stderr,
            flush=True,
        )

    return head.serve(site, ready=ready)
