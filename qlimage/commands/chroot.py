"""`qlimage chroot create|clone|edit|remove|list`: UnionFS chroots (chroots/<name>/chroot.toml
plus a Debian tree the head exports by NFS); the logic is in qlimage/admin/chroots.py."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from qlimage.commands.interact import confirm, finish

if TYPE_CHECKING:
    from qlimage.site import Site


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("chroot", help="create, clone, edit, remove or list UnionFS chroots")
    actions = s.add_subparsers(dest="action", required=True)

    create = actions.add_parser(
        "create",
        help="build a Debian tree with mmdebstrap in [paths] chroot_trees/NAME and define it",
    )
    create.add_argument("name", metavar="NAME")
    create.add_argument("--description", default="", help="what the chroot is for")
    create.add_argument("--server", help="IPv4 address of the NFS server (default: the head)")
    create.add_argument("--port", type=int, help="the server's NFSv4 port (default 2049)")
    create.add_argument(
        "--export", help="the path nodes mount from the server (default: the tree's path)"
    )
    create.add_argument("--flavor", default="bookworm", help="Debian suite (default: bookworm)")
    create.add_argument("--version", default="13.0", help="Qlustar release x.y (default: 13.0)")
    create.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="TASK",
        help="a package bundle of site.toml [chroot_tasks] to install (repeatable)",
    )
    create.set_defaults(func=cmd_create)

    clone = actions.add_parser(
        "clone", help="copy chroot SRC (tree and definition) to NEW; rename = clone + remove"
    )
    clone.add_argument("source", metavar="SRC")
    clone.add_argument("name", metavar="NEW")
    clone.add_argument("--description", help="the clone's description (default: SRC's)")
    clone.set_defaults(func=cmd_clone)

    edit = actions.add_parser("edit", help="change a chroot's description")
    edit.add_argument("name", metavar="NAME")
    edit.add_argument("--description", required=True)
    edit.set_defaults(func=cmd_edit)

    remove = actions.add_parser(
        "remove",
        help="delete a chroot's definition and tree (refused while images or nodes use it)",
    )
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--yes", action="store_true", help="do not ask for a confirmation")
    remove.set_defaults(func=cmd_remove)

    for p in (create, clone, edit, remove):
        p.add_argument("--no-build", action="store_true", help="rebuild nothing")
        p.add_argument("--no-wait", action="store_true", help="fail if a build is running")
        p.add_argument(
            "--quiet", action="store_true", help="no progress lines (mmdebstrap, the rebuild)"
        )

    listing = actions.add_parser("list", help="each chroot, where it is served from, its users")
    listing.set_defaults(func=cmd_list)


def cmd_create(site: Site, args: argparse.Namespace) -> int:
    from qlimage.admin.chroots import create

    quiet(args)
    outcome = create(
        site,
        args.name,
        description=args.description,
        server=args.server,
        port=args.port,
        export=args.export,
        flavor=args.flavor,
        version=args.version,
        tasks=args.task,
        wait=not args.no_wait,
        build=not args.no_build,
    )
    print(f"chroot {args.name}: created in {outcome.tree}")
    return finish(site.paths.root, outcome.rebuilt, changed=outcome.changed)


def cmd_clone(site: Site, args: argparse.Namespace) -> int:
    from qlimage.admin.chroots import clone

    quiet(args)
    outcome = clone(
        site,
        args.source,
        args.name,
        description=args.description,
        wait=not args.no_wait,
        build=not args.no_build,
    )
    print(f"chroot {args.name}: cloned from {args.source} into {outcome.tree}")
    return finish(site.paths.root, outcome.rebuilt, changed=outcome.changed)


def cmd_edit(site: Site, args: argparse.Namespace) -> int:
    from qlimage.admin.chroots import edit

    quiet(args)
    outcome = edit(
        site,
        args.name,
        description=args.description,
        wait=not args.no_wait,
        build=not args.no_build,
    )
    print(f"chroot {args.name}: description {'set' if outcome.changed else 'unchanged'}")
    return finish(site.paths.root, outcome.rebuilt, changed=outcome.changed)


def cmd_remove(site: Site, args: argparse.Namespace) -> int:
    from qlimage.admin.chroots import check_unused, known, managed_tree, remove

    quiet(args)
    chroot = known(site, args.name)
    check_unused(site, args.name)  # before asking: a used chroot is never offered for removal
    tree = managed_tree(site, chroot)
    if not args.yes:
        what = f"its tree {tree} and " if tree else ""
        confirm(
            f"Remove chroot {args.name}: {what}its definition? [y/N] ",
            sys.stdin,
            "chroot remove",
            "removed",
        )
    outcome = remove(site, args.name, wait=not args.no_wait, build=not args.no_build)
    kept = "" if tree else f" (its tree {chroot.path} is not under [paths] chroot_trees: kept)"
    print(f"chroot {args.name}: removed{kept}")
    return finish(site.paths.root, outcome.rebuilt, changed=outcome.changed)


def quiet(args: argparse.Namespace) -> None:
    if args.quiet:
        from qlimage import progress

        progress.silence()


def cmd_list(site: Site, args: argparse.Namespace) -> int:
    from qlimage.admin.chroots import listing

    rows = [
        (
            c.chroot.name,
            c.chroot.flavor or "-",
            c.chroot.version or "-",
            f"{c.chroot.server}:{c.chroot.export}",
            c.chroot.description or "-",
            ", ".join(c.users) or "(unused)",
        )
        for c in listing(site)
    ]
    if not rows:
        print(f"no chroot under {site.paths.chroots}")
        return 0
    header = ("NAME", "FLAVOR", "VERSION", "SERVER:EXPORT", "DESCRIPTION", "USED BY")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for r in [header, *rows]:
        print("  ".join(f"{v:<{w}}" for v, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return 0
