"""`qlimage build [--no-wait] [doit options]`: run the site's doit graph (what changed).

Without doit options it first compares the last full build's stamp (`tasks.stamp`) with the
site, before the site is even loaded, and answers "nothing to do" when nothing changed."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qlimage.site import Site


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("build", help="build what changed (doit run); extra args go to doit")
    s.add_argument("--no-wait", action="store_true", help="fail if another build is running")
    s.add_argument("--quiet", action="store_true", help="no progress of long work")
    s.add_argument("doit_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=run, before_site=nothing_to_do)


# What a build imports anyway (loading the site, its templates, doit and the graph): imported
# while the stamp check looks at the outputs, once it knows that a build follows.
BUILD_MODULES = ("jsonschema", "jinja2", "doit.doit_cmd", "qlimage.tasks.graph")


def import_build_modules() -> None:
    for name in BUILD_MODULES:
        importlib.import_module(name)


def nothing_to_do(args: argparse.Namespace) -> int | None:
    """Before the site is loaded: 0 when the stamp says a full build would do nothing, else
    None (and the moment the build started, which decides whether it may stamp)."""
    from qlimage.tasks import stamp

    if args.doit_args:
        return None
    args.started_ns = stamp.started()
    if stamp.up_to_date(Path(args.site), import_build_modules):
        print("qlimage: nothing to do (no input changed since the last build)")
        return 0
    return None


def run(site: Site, args: argparse.Namespace) -> int:
    from qlimage.tasks import stamp
    from qlimage.tasks.run import GraphFiles, run_graph

    if args.quiet:
        from qlimage import progress

        progress.silence()
    started: int | None = getattr(args, "started_ns", None)

    def stamp_build(named: GraphFiles) -> None:
        if started is not None:
            stamp.write(site, started, named.targets, named.file_dep, named.settled())

    full = not args.doit_args and started is not None
    return run_graph(
        site,
        ["run", *args.doit_args],
        wait=not args.no_wait,
        on_success=stamp_build if full else None,
    )
