"""`qlimage edit` (the seed's `qlustar-image-edit`): edit the files that enter images and nodes.

-e [IMAGE] PATH      create or edit overlays/common/copy/PATH (overlays/IMAGE/copy/PATH)
-d [IMAGE] PATH      delete that file again (undoes the -e)
-r -e CONFIG PATH    create or edit rootfs/CONFIG/PATH (a Root FS Customization config)
-r -d CONFIG PATH    delete it
-i IMAGE / -s IMAGE  a shell in the unpacked initrd / squashfs of the image (admin/handedit.py)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from qlimage.errors import QlimageError

if TYPE_CHECKING:
    from qlimage.admin.editor import Outcome, Tree
    from qlimage.site import Site


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser(
        "edit",
        help="edit overlay and Root FS Customization files, or an image by hand",
        description="Create, edit or delete the files that enter every image (overlays/common/"
        "copy), one image (overlays/IMAGE/copy) or the nodes of a Root FS Customization config "
        "(rootfs/CONFIG), in $VISUAL, $EDITOR or the system's editor; the images and bundles "
        "are rebuilt when a file changed. -i/-s edit a published image by hand.",
        epilog="examples: -e /etc/motd | -e demo /etc/motd | -r -e tweaks /etc/issue | "
        "-r -d tweaks /etc/issue | -s demo",
    )
    s.add_argument("-e", "--edit", action="store_true", help="create or edit the file")
    s.add_argument("-d", "--delete", action="store_true", help="delete the file")
    s.add_argument(
        "-r", "--rootfs", action="store_true", help="in the Root FS Customization config CONFIG"
    )
    s.add_argument("-i", "--initrd", metavar="IMAGE", help="edit the image's initrd in a shell")
    s.add_argument("-s", "--squashfs", metavar="IMAGE", help="edit the image's OS in a shell")
    s.add_argument("names", nargs="*", metavar="NAME", help="[IMAGE] PATH, or with -r: CONFIG PATH")
    s.add_argument("--no-build", action="store_true", help="change the file, rebuild nothing")
    s.add_argument("--no-wait", action="store_true", help="fail if a build is running")
    s.set_defaults(func=run, before_site=check_args)


def check_args(args: argparse.Namespace) -> None:
    """Before the site is loaded: exactly one action and the names it takes (one line each)."""
    actions = [
        flag
        for flag, on in (
            ("-e", args.edit),
            ("-d", args.delete),
            ("-i", args.initrd is not None),
            ("-s", args.squashfs is not None),
        )
        if on
    ]
    if len(actions) != 1:
        given = " and ".join(actions) if actions else "none"
        raise QlimageError(f"edit: give one of -e, -d, -i IMAGE, -s IMAGE (given: {given})")
    action, n = actions[0], len(args.names)
    if action in ("-i", "-s"):
        if args.rootfs or n:
            raise QlimageError(f"edit: {action} IMAGE takes no -r and no other names")
    elif args.rootfs and n != 2:
        raise QlimageError(f"edit: -r {action} takes CONFIG PATH (given {n} names)")
    elif not args.rootfs and n not in (1, 2):
        raise QlimageError(f"edit: {action} takes [IMAGE] PATH (given {n} names)")


def target_tree(site: Site, args: argparse.Namespace) -> tuple[Tree, str]:
    from qlimage.admin.editor import overlay_tree
    from qlimage.admin.rootfs import config_tree

    if args.rootfs:
        return config_tree(site, args.names[0]), args.names[1]
    image = args.names[0] if len(args.names) == 2 else None
    return overlay_tree(site, image), args.names[-1]


def run(site: Site, args: argparse.Namespace) -> int:
    wait, build = not args.no_wait, not args.no_build
    if args.initrd is not None or args.squashfs is not None:
        from qlimage.admin.handedit import shell_edit  # another room's work: -i/-s print theirs

        part = "initrd" if args.initrd is not None else "squashfs"
        shell_edit(site, args.initrd or args.squashfs, part, wait=wait, build=build)
        return 0
    from qlimage.admin.editor import delete_in, edit_in

    tree, rel = target_tree(site, args)
    if args.delete:
        outcome = delete_in(site, tree, rel, wait=wait, build=build)
    else:
        outcome = edit_in(site, tree, rel, wait=wait, build=build, env=os.environ)
    return report(site, args, outcome)


def report(site: Site, args: argparse.Namespace, outcome: Outcome) -> int:
    shown = os.path.relpath(outcome.path, site.paths.root)
    if not outcome.changed:
        print(f"{shown}: unchanged, nothing to rebuild")
        return 0
    print(f"{shown}: {'deleted' if args.delete else 'saved'}")
    if outcome.rebuilt is None:
        print(f"not rebuilt (--no-build); to rebuild: qlimage -C {site.paths.root} build")
        return 0
    if outcome.rebuilt:
        print(f"qlimage: the rebuild ended with status {outcome.rebuilt}", file=sys.stderr)
    return outcome.rebuilt
