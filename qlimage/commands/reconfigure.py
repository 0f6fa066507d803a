"""`qlimage reconfigure IMAGE|all` (the seed's `qlustar-image-reconfigure`): an image's own root
password (`--password`, `--password-stdin`), the head's again (`--head-password`), or, with
neither, its hand edits (`qlimage edit -i/-s`) reset by rebuilding it from its inputs."""

from __future__ import annotations

import argparse
import sys

from qlimage.errors import QlimageError
from qlimage.site import Site

ALL = "all"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser(
        "reconfigure",
        help="set an image's root password, or reset its hand edits (rebuild from inputs)",
        description=__doc__,
    )
    s.add_argument("image", metavar="IMAGE|all", help="an image of images.d, or all of them")
    how = s.add_mutually_exclusive_group()
    how.add_argument(
        "--password", action="store_true", help="set the image's own root password (asked twice)"
    )
    how.add_argument(
        "--password-stdin",
        action="store_true",
        help="set the image's own root password, read as one line from standard input",
    )
    how.add_argument(
        "--head-password", action="store_true", help="use the head's root password again"
    )
    s.add_argument("--no-build", action="store_true", help="change, but do not rebuild")
    s.add_argument("--no-wait", action="store_true", help="fail if a build is running")
    s.set_defaults(func=run)


def images_of(site: Site, name: str) -> list[str]:
    if name == ALL:
        return sorted(site.images)
    if name not in site.images:
        known = ", ".join(sorted(site.images)) or "none"
        raise QlimageError(f"unknown image {name!r} (images.d has: {known}, or `all`)")
    return [name]


def run(site: Site, args: argparse.Namespace) -> int:
    from qlimage.admin import handedit, rootpw

    images = images_of(site, args.image)
    wait, build = not args.no_wait, not args.no_build
    if args.password or args.password_stdin:
        password = (
            rootpw.read_password_stdin(sys.stdin.buffer.read())
            if args.password_stdin
            else rootpw.ask_password()
        )
        hash_ = rootpw.hash_password(password)
        rootpw.set_password(site, images, hash_, wait=wait, build=build)
    elif args.head_password:
        rootpw.set_password(site, images, None, wait=wait, build=build)
    else:
        handedit.reset_edits(site, images, wait=wait, build=build)
    return 0
