"""`qlimage apt-hook install|uninstall|collect|rebuild`: module packages apt installs feed the
pool, and the images follow (the logic is in qlimage.pool.apthook)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlimage.errors import QlimageError
from qlimage.pool.apthook import (
    DEFAULT_APT_CONF_DIR,
    PREFIX,
    SNIPPET,
    collect,
    collect_summary,
    hook_input_paths,
    install,
    rebuild,
    uninstall,
)
from qlimage.site import Site


def cmd_install(site: Site, args: argparse.Namespace) -> int:
    path = install(site, args.apt_conf_dir)
    print(f"{PREFIX}: wrote {path}: apt now feeds {site.paths.pool} and rebuilds the images")
    return 0


def cmd_uninstall(site: Site, args: argparse.Namespace) -> int:
    path = uninstall(args.apt_conf_dir)
    if path is None:
        print(f"{PREFIX}: no {args.apt_conf_dir / SNIPPET}: nothing to remove")
    else:
        print(f"{PREFIX}: removed {path}")
    return 0


def read_hook_input(args: argparse.Namespace) -> list[Path]:
    if args.debs:
        return list(args.debs)
    if sys.stdin is None or sys.stdin.isatty():
        raise QlimageError(
            "collect reads apt's list of .deb files from stdin",
            hint="give the .deb files as arguments to collect them by hand",
        )
    return hook_input_paths(sys.stdin.read().splitlines())


def cmd_collect(site: Site, args: argparse.Namespace) -> int:
    """Always 0: apt aborts the whole installation when a Pre-Install-Pkgs hook fails."""
    try:
        result = collect(site, read_hook_input(args))
    except Exception as e:  # anything at all: report it and let apt go on
        print(f"{PREFIX} collect: {e}", file=sys.stderr)
        return 0
    for error in result.errors:
        print(f"{PREFIX} collect: {error}", file=sys.stderr)
    summary = collect_summary(site, result)
    if summary:
        print(summary, file=sys.stderr)
    return 0


def cmd_rebuild(site: Site, args: argparse.Namespace) -> int:
    try:
        result = rebuild(site, wait=not args.no_wait)
    except QlimageError as e:
        raise QlimageError(
            f"apt-hook rebuild: {e}",
            hint=f"the pool change stays pending; fix this, then run "
            f"`qlimage -C {site.paths.root} apt-hook rebuild` (or any apt run does it)",
        ) from e
    if result is None:
        return 0
    sys.stdout.flush()
    rebuilt = ", ".join(result.rebuilt) or "none"
    unchanged = ", ".join(result.unchanged) or "none"
    if result.status != 0:
        print(
            f"{PREFIX}: image build failed (doit status {result.status}); the pool change stays "
            f"pending (images rebuilt so far: {rebuilt})",
            file=sys.stderr,
        )
        return 1
    print(f"{PREFIX}: images rebuilt: {rebuilt}; unchanged: {unchanged}", flush=True)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `apt-hook` (install, uninstall, collect, rebuild) to the `qlimage` command."""
    p = sub.add_parser(
        "apt-hook", help="head node: module packages installed by apt rebuild the images"
    )
    actions = p.add_subparsers(dest="apt_hook_action", required=True)
    for name, func, text in (
        ("install", cmd_install, f"write the apt hooks to APT_CONF_DIR/{SNIPPET}"),
        ("uninstall", cmd_uninstall, f"remove APT_CONF_DIR/{SNIPPET}"),
    ):
        a = actions.add_parser(name, help=text)
        a.add_argument(
            "--apt-conf-dir",
            type=Path,
            default=DEFAULT_APT_CONF_DIR,
            help=f"apt's configuration parts directory (default: {DEFAULT_APT_CONF_DIR})",
        )
        a.set_defaults(func=func)
    a = actions.add_parser(
        "collect", help="(apt's Pre-Install-Pkgs hook) copy module .debs from stdin to the pool"
    )
    a.add_argument("debs", nargs="*", type=Path, help=".deb files instead of apt's list on stdin")
    a.set_defaults(func=cmd_collect)
    a = actions.add_parser(
        "rebuild", help="(apt's Post-Invoke hook) rebuild the images if collect changed the pool"
    )
    a.add_argument("--no-wait", action="store_true", help="fail if another build is running")
    a.set_defaults(func=cmd_rebuild)
