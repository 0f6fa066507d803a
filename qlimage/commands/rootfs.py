"""`qlimage rootfs new|delete|list`: Root FS Customization configs (rootfs/<config>/), the files
nodes receive before their init runs; `qlimage edit -r` edits the files of one."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from qlimage.commands.interact import confirm, finish

if TYPE_CHECKING:
    from qlimage.admin.editor import Outcome
    from qlimage.site import Site


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("rootfs", help="create, delete or list Root FS Customization configs")
    actions = s.add_subparsers(dest="action", required=True)
    new = actions.add_parser("new", help="create rootfs/NAME/ (with lib/qlustar/init.d/)")
    new.add_argument("name", metavar="NAME")
    new.set_defaults(func=cmd_new)
    delete = actions.add_parser(
        "delete", help="delete rootfs/NAME/ and every file below it (refused while nodes use it)"
    )
    delete.add_argument("name", metavar="NAME")
    delete.add_argument("--yes", action="store_true", help="do not ask for a confirmation")
    delete.set_defaults(func=cmd_delete)
    for p in (new, delete):
        p.add_argument("--no-build", action="store_true", help="rebuild nothing")
        p.add_argument("--no-wait", action="store_true", help="fail if a build is running")
    listing = actions.add_parser("list", help="each config and the nodes using it")
    listing.set_defaults(func=cmd_list)


def cmd_list(site: Site, args: argparse.Namespace) -> int:
    from qlimage.admin.rootfs import list_configs

    configs = list_configs(site)
    if not configs:
        print(f"no Root FS Customization config under {site.paths.rootfs}")
    width = max((len(c.name) for c in configs), default=0)
    for c in configs:
        print(f"{c.name:<{width}}  {', '.join(c.nodes) if c.nodes else '(no node)'}")
    return 0


def cmd_new(site: Site, args: argparse.Namespace) -> int:
    from qlimage.admin.rootfs import create

    outcome = create(site, args.name, wait=not args.no_wait, build=not args.no_build)
    print(f"{shown(site, outcome)}: created; add files: qlimage edit -r -e {args.name} PATH")
    return finish(site.paths.root, outcome.rebuilt)


def cmd_delete(site: Site, args: argparse.Namespace) -> int:
    from qlimage.admin.rootfs import check_unused, file_count, known_config

    path = known_config(site, args.name)
    check_unused(site, args.name)  # before asking: a used config is never offered for deletion
    if not args.yes:
        confirm(
            f"Delete Root FS Customization config {args.name}? Every file and directory under"
            f" {path} ({file_count(path)} files) will be deleted. [y/N] ",
            sys.stdin,
            "rootfs delete",
            "deleted",
        )
    from qlimage.admin.rootfs import delete

    outcome = delete(site, args.name, wait=not args.no_wait, build=not args.no_build)
    print(f"{shown(site, outcome)}: deleted")
    return finish(site.paths.root, outcome.rebuilt)


def shown(site: Site, outcome: Outcome) -> str:
    return os.path.relpath(outcome.path, site.paths.root)
