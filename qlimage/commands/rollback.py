"""`qlimage rollback IMAGE`: make the image's previous generation current again."""

from __future__ import annotations

import argparse

from qlimage.site import Site


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("rollback", help="make the image's previous generation current again")
    s.add_argument("image")
    s.add_argument("--no-wait", action="store_true", help="fail if a build is running")
    s.set_defaults(func=run)


def run(site: Site, args: argparse.Namespace) -> int:
    from qlimage.image.publish import rollback_image

    gen = rollback_image(site, args.image, wait=not args.no_wait)
    print(f"image {args.image}: generation {gen} is current again")
    return 0
