"""The `qlimage` command: user errors are one line each with exit status 2; tracebacks only
with --debug."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from qlimage import __version__
from qlimage.errors import ConfigError, QlimageError
from qlimage.site import Site, load_site


def report(error: QlimageError) -> None:
    lines = error.problems if isinstance(error, ConfigError) else [str(error)]
    for line in lines:
        print(f"qlimage: {line}", file=sys.stderr)


def exit_on_user_error(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except QlimageError as e:
        report(e)
        sys.exit(e.exit_status)


def load_site_or_exit(root: str | Path) -> Site:
    """For dodo.py: a bad site ends doit with the one-line errors and status 2."""
    return exit_on_user_error(lambda: load_site(root))


def run_doit(site: Site, args: Sequence[str], tasks: dict[str, Any] | None = None) -> int:
    from doit.cmd_base import ModuleTaskLoader
    from doit.doit_cmd import DoitMain

    from qlimage.tasks.graph import doit_config, site_tasks

    if tasks is None:
        tasks = site_tasks(site)  # resolves everything first: a bad site creates nothing
    namespace = {"DOIT_CONFIG": doit_config(site), **tasks}
    return int(DoitMain(ModuleTaskLoader(namespace)).run(list(args)))


def cmd_validate(site: Site, args: argparse.Namespace) -> int:
    from qlimage.bundle.render import render_bundle
    from qlimage.tasks.graph import plan

    plan(site)  # resolves every image's modules: unknown modules fail here
    problems = []
    for host in site.hosts:  # a build renders only changed nodes; validate renders them all
        try:
            render_bundle(site, host)
        except QlimageError as e:
            problems += e.problems if isinstance(e, ConfigError) else [str(e)]
    if problems:
        raise ConfigError(problems)
    print(
        f"{site.name}: {len(site.images)} image(s), {len(site.hosts)} node(s), "
        f"{len(site.bootconfigs)} boot config(s): ok"
    )
    return 0


def cmd_build(site: Site, args: argparse.Namespace) -> int:
    from qlimage.image.publish import build_lock
    from qlimage.tasks.graph import site_tasks

    # Planned before the lock: an image that cannot be resolved fails before anything exists.
    tasks = site_tasks(site)
    with build_lock(site.paths.bootfiles, wait=not args.no_wait):
        return run_doit(site, ["run", *args.doit_args], tasks)


def cmd_rollback(site: Site, args: argparse.Namespace) -> int:
    from qlimage.image.publish import build_lock, rollback
    from qlimage.layout import Layout

    if args.image not in site.images:
        raise QlimageError(
            f"unknown image {args.image!r} (images.d has: "
            f"{', '.join(sorted(site.images)) or 'none'})"
        )
    with build_lock(site.paths.bootfiles, wait=not args.no_wait):
        gen = rollback(Layout(site).image_root(args.image))
    print(f"image {args.image}: generation {gen} is current again")
    return 0


def cmd_doit(site: Site, args: argparse.Namespace) -> int:
    from qlimage.image.publish import build_lock

    if doit_runs_tasks(args.doit_args):
        with build_lock(site.paths.bootfiles):
            return run_doit(site, args.doit_args)
    return run_doit(site, args.doit_args)


# doit commands that only read the graph; anything else may run tasks and takes the build lock.
READ_ONLY_DOIT = {"list", "info", "help", "dumpdb", "tabcompletion", "graph", "forget", "ignore"}


def doit_runs_tasks(argv: Sequence[str]) -> bool:
    command = next((a for a in argv if not a.startswith("-")), "run")
    return command not in READ_ONLY_DOIT


def cmd_vm(site: Site, args: argparse.Namespace) -> int:
    from qlimage.serve import vm

    def show(line: str) -> None:
        print(line, flush=True)

    result = vm.boot(
        site,
        args.node,
        timeout=args.timeout,
        memory=args.memory,
        on_line=None if args.quiet else show,
    )
    verdict = "ok" if result.ok else "FAILED"
    print(
        f"qlimage vm {args.node}: {verdict}: {result.reason} ({result.seconds:.1f} s, "
        f"accel {vm.accelerator()})",
        file=sys.stderr,
    )
    if not result.ok:
        if args.quiet:
            print(result.tail(), file=sys.stderr)
        return 1
    return 0


def cmd_preview(site: Site, args: argparse.Namespace) -> int:
    from qlimage.bundle import render as bundle

    new = bundle.render_bundle(site, site.host(args.node))
    if args.previous is None:
        print(bundle.describe(new), end="")
        return 0
    try:
        old = Path(args.previous).read_bytes()
    except OSError as e:
        raise QlimageError(f"{args.previous}: cannot read the previous bundle: {e.strerror}") from e
    print(bundle.diff(old, new) or "no change")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlimage", description=__doc__)
    p.add_argument("--version", action="version", version=f"qlimage {__version__}")
    p.add_argument("-C", "--site", default=".", help="the site directory (default: .)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("validate", help="check every site file and resolve every image")
    s.set_defaults(func=cmd_validate)
    s = sub.add_parser("build", help="build what changed (doit run); extra args go to doit")
    s.add_argument("--no-wait", action="store_true", help="fail if another build is running")
    s.add_argument("doit_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_build)
    s = sub.add_parser("rollback", help="make the image's previous generation current again")
    s.add_argument("image")
    s.add_argument("--no-wait", action="store_true", help="fail if a build is running")
    s.set_defaults(func=cmd_rollback)
    s = sub.add_parser("doit", help="any doit command on the site's graph (list, info, forget...)")
    s.add_argument("doit_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_doit)
    s = sub.add_parser("vm", help="PXE-boot a node of the site in QEMU and stream its console")
    s.add_argument("node")
    s.add_argument("--timeout", type=float, default=240.0, help="seconds (default 240)")
    s.add_argument("--memory", type=int, default=1024, help="MiB of guest memory")
    s.add_argument("--quiet", action="store_true", help="print the console only on failure")
    s.set_defaults(func=cmd_vm)
    s = sub.add_parser("preview", help="every file and action a node receives (or the diff)")
    s.add_argument("node")
    s.add_argument("--previous", metavar="BUNDLE", help="a previous bundle.json to diff against")
    s.set_defaults(func=cmd_preview)
    from qlimage.pool import apthook
    from qlimage.tasks import repro

    apthook.register(sub)
    repro.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> NoReturn:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if hasattr(args, "doit_args"):
        # Options meant for doit (`qlimage build -a stage:demo`) pass through untouched.
        args.doit_args = [a for a in [*extra, *args.doit_args] if a != "--"]
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        site = load_site(args.site)
        status = args.func(site, args)
    except QlimageError as e:
        if args.debug:
            traceback.print_exc()
        report(e)
        sys.exit(e.exit_status)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:
        if args.debug:
            raise
        exc = sys.exc_info()[1]
        print(
            f"qlimage: internal error: {exc!r} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        sys.exit(70)
    sys.exit(status)
