"""`qlimage validate`: check every site file, resolve every image, render every node's bundle."""

from __future__ import annotations

import argparse

from qlimage.site import Site


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("validate", help="check every site file and resolve every image")
    s.set_defaults(func=run)


def run(site: Site, args: argparse.Namespace) -> int:
    from qlimage.tasks.check import check_site

    check_site(site)
    print(
        f"{site.name}: {len(site.images)} image(s), {len(site.hosts)} node(s), "
        f"{len(site.bootconfigs)} boot config(s): ok"
    )
    return 0
