"""The `qlimage` command: user errors are one line each with exit status 2; tracebacks only
with --debug."""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from qlimage import __version__
from qlimage.commands import VERBS
from qlimage.errors import ConfigError, QlimageError, TaskCrashed, TaskFailures
from qlimage.site import load_site

# Exit statuses besides a user error's (QlimageError.exit_status, 2): a bug, an interrupt.
EXIT_BUG = 70
EXIT_INTERRUPTED = 130


def report(error: QlimageError) -> None:
    lines = error.problems if isinstance(error, ConfigError | TaskFailures) else [str(error)]
    for line in lines:
        print(f"qlimage: {line}", file=sys.stderr)


def exit_on_user_error(fn: Callable[[], Any]) -> Any:
    """For dodo.py: a bad site ends doit with the one-line errors and status 2."""
    try:
        return fn()
    except QlimageError as e:
        report(e)
        sys.exit(e.exit_status)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlimage", description=__doc__)
    p.add_argument("--version", action="version", version=f"qlimage {__version__}")
    p.add_argument("-C", "--site", default=".", help="the site directory (default: .)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        importlib.import_module(f"qlimage.commands.{verb}").register(sub)
    return p


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if hasattr(args, "doit_args"):
        # Options meant for doit (`qlimage build -a stage:demo`) pass through untouched.
        args.doit_args = [a for a in [*extra, *args.doit_args] if a != "--"]
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


# Allocations between two young-generation collections once the site is loaded (Python's
# default, 700, made 17 collections walk 10,000 nodes' worth of young objects in one build).
GC_THRESHOLD = 100_000


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cycle collector off until the site is loaded (settle_memory), and as it was after
    the command (a test may call main in its own process). What the command left is frozen,
    not collected: the process ends here, and its last collection then walks none of it."""
    enabled, threshold = gc.isenabled(), gc.get_threshold()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.set_threshold(*threshold)
        if enabled:
            gc.enable()


def settle_memory() -> None:
    """The loaded site lives as long as the command, and loading it makes hardly any garbage
    cycles: so the cycle collector is off while it loads, and afterwards never walks it again
    (a 10,000-node site is a million objects; the collections of one build walked them for
    0.1 s). Then it runs, less often."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
    gc.enable()


def main(argv: Sequence[str] | None = None) -> NoReturn:
    with collector_paused():
        run_command(argv)


def run_command(argv: Sequence[str] | None) -> NoReturn:
    args = parse(argv)
    try:
        # A verb may answer before the site is loaded (`build` with nothing to do).
        before = getattr(args, "before_site", None)
        if before is not None and (early := before(args)) is not None:
            sys.exit(early)
        site = load_site(args.site)
        settle_memory()
        status = args.func(site, args)
    except QlimageError as e:
        if args.debug:
            traceback.print_exc()
            if isinstance(e, TaskFailures):  # the commands and the tools' stderr
                print("\n".join(e.details), file=sys.stderr)
        report(e)
        sys.exit(e.exit_status)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:
        if args.debug:
            if isinstance(e, TaskCrashed):  # the task's own traceback, from inside doit
                print(e.details, file=sys.stderr)
            raise
        exc = sys.exc_info()[1]
        print(
            f"qlimage: internal error: {exc!r} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        sys.exit(EXIT_BUG)
    sys.exit(status)


# The seed's own command names: `qlustar-image-edit ARGS` is `qlimage edit ARGS`.
SEED_COMMANDS = {"qlustar-image-edit": "edit", "qlustar-image-reconfigure": "reconfigure"}
GLOBAL_FLAGS = ("--debug",)
GLOBAL_VALUES = ("-C", "--site")


def seed_argv(verb: str, argv: Sequence[str]) -> list[str]:
    """qlimage's argument list for a seed command: the global options (`-C DIR`, `--site=DIR`,
    `--debug`) may come anywhere; the site defaults to $QLIMAGE_SITE, else the current
    directory, as for qlimage."""
    front = ["-C", os.environ.get("QLIMAGE_SITE", ".")]
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        name, eq, value = arg.partition("=")
        if arg in GLOBAL_FLAGS:
            front.append(arg)
        elif name in GLOBAL_VALUES and eq:
            front += ["-C", value]
        elif arg in GLOBAL_VALUES:
            front += ["-C", next(args, "")]
        else:
            rest.append(arg)
    return [*front, verb, *rest]


def seed_main() -> NoReturn:
    """Entry point of the console scripts named after the seed's commands."""
    prog = os.path.basename(sys.argv[0])
    main(seed_argv(SEED_COMMANDS[prog], sys.argv[1:]))
