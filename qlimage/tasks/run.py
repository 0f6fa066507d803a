"""The ONE place that takes the build lock and runs doit on a site's graph.

`qlimage build`, `qlimage doit`, the apt hook and every future command call `run_graph`; a
`dodo.py` (doit itself running) calls `dodo_namespace`. Both decide about the lock with
`runs_tasks`, so builds of one site never overlap, whichever command started them.

Errors come out the way every other user error does. Before doit starts, `check_build` finds
what can be found without building (ConfigError, one line each). A task that stops on a user
error returns a `graph.UserFailure`; the `Reporter` here collects it instead of printing doit's
failure report, and `run_graph` raises it once doit has returned and saved its state: one line
per failure on standard error (`task: problem`), exit status 2. A task that raises anything
else is a bug: TaskCrashed, exit status 70, its traceback with --debug.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from doit.exceptions import BaseFail, UnmetDependency
from doit.reporter import ConsoleReporter

from qlimage import pieces
from qlimage.atomic import clamp_served_dirs
from qlimage.errors import TaskCrashed, TaskFailures
from qlimage.image.publish import build_lock
from qlimage.layout import Layout
from qlimage.site import Site
from qlimage.tasks import stamp

# doit commands that only read the graph and its state. (forget and ignore write the state, so
# they wait for a running build like anything that may run tasks.)
READ_ONLY_DOIT = frozenset({"list", "info", "help", "dumpdb", "tabcompletion", "graph"})
# doit's status for errors in its own command line (an unknown task or option).
DOIT_USAGE_ERROR = 3


def runs_tasks(doit_args: Sequence[str]) -> bool:
    """Whether these doit arguments may run tasks or write doit's state (and so need the
    build lock)."""
    command = next((a for a in doit_args if not a.startswith("-")), "run")
    return command not in READ_ONLY_DOIT


def planned_tasks(site: Site) -> dict[str, Any]:
    """The `task_*` creators, after every check that needs no task (`check_build`): a site
    that would fail there fails with one-line errors and creates nothing."""
    from qlimage.tasks.check import check_build
    from qlimage.tasks.graph import site_tasks

    return site_tasks(site, check_build(site))


PER_NODE_PREFIX = "bundle:"
# The key of a task's `meta` that holds a NodeBundles (graph.task_bundles).
PER_NODE = "per_node"
# The key of a task's `meta` that lists files it writes that doit does not check (its own
# up-to-date check does): the build stamp keys them like targets.
OUTPUTS = "outputs"


def per_node(task: Any) -> Any:
    """The NodeBundles of the task that publishes every node's bundle, else None."""
    return (task.meta or {}).get(PER_NODE)


class Reporter(ConsoleReporter):
    """doit's console reporter (`.  task` lines on standard output) that keeps failures to
    itself: `problems` are one line each (`task: problem`), `crashes` are bugs. With `echo`
    (plain `doit` through dodo.py, where nobody raises them afterwards) it prints them on
    standard error at the end, qlimage style.

    The bundle task reports per node: `.  bundle:<node>` for each node it published, and one
    line for all the others (a site of 10,000 nodes would print 10,000 lines on every build)."""

    def __init__(self, outstream: IO[str], options: dict[str, Any], *, echo: bool = False):
        super().__init__(outstream, options)
        self.echo = echo
        self.problems: list[str] = []
        self.details: list[str] = []
        self.crashes: list[tuple[str, str]] = []  # (one line, traceback)
        self.nodes_uptodate = 0

    def execute_task(self, task: Any) -> None:
        if per_node(task) is None:
            super().execute_task(task)

    def add_success(self, task: Any) -> None:
        self.count_nodes(task)

    def skip_uptodate(self, task: Any) -> None:
        if per_node(task) is None:
            super().skip_uptodate(task)
        else:
            self.nodes_uptodate += len(per_node(task).site.hosts)

    def count_nodes(self, task: Any) -> None:
        nodes = per_node(task)
        if nodes is not None:
            for name in nodes.published:
                self.write(f".  {PER_NODE_PREFIX}{name}\n")
            self.nodes_uptodate += len(nodes.site.hosts) - len(nodes.due())

    def add_failure(self, task: Any, fail: BaseFail) -> None:
        from qlimage.tasks.graph import UserFailure

        self.count_nodes(task)
        if isinstance(fail, UserFailure):
            # The bundle task's lines start with their node: `bundle:beo-01: ...`.
            prefix = f"{task.name}: " if per_node(task) is None else PER_NODE_PREFIX
            self.problems += [f"{prefix}{line}" for line in fail.lines]
            self.details.append(f"{task.name}: {fail.message}")
        elif isinstance(fail, UnmetDependency):
            pass  # a task skipped because another failed: that one is reported
        elif fail.traceback:
            last = "".join(fail.traceback).strip().splitlines()[-1]
            self.crashes.append((f"{task.name}: {last}", "".join(fail.traceback)))
        else:  # doit's own finding, e.g. a file_dep deleted while the build ran
            self.problems.append(f"{task.name}: {' '.join(fail.message.split())}")

    def runtime_error(self, msg: str) -> None:
        self.crashes.append((" ".join(msg.split()), msg))

    def complete_run(self) -> None:
        if self.nodes_uptodate:
            self.write(f"-- {PER_NODE_PREFIX}* ({self.nodes_uptodate} nodes)\n")
        if not self.echo:
            return
        for line, _ in self.crashes:
            print(f"qlimage: internal error: {line}", file=sys.stderr)
        for line in self.problems:
            print(f"qlimage: {line}", file=sys.stderr)

    def raise_failures(self) -> None:
        """What stopped the run, as the exception the CLI reports: a bug first."""
        if self.crashes:
            line, details = self.crashes[0]
            raise TaskCrashed(line, details)
        if self.problems:
            raise TaskFailures(self.problems, self.details)


class GraphFiles:
    """The files the tasks name (`targets`, `file_dep`), noted as doit creates the tasks."""

    def __init__(self) -> None:
        self.targets: set[str] = set()
        self.file_dep: set[str] = set()
        self.settled: Callable[[], list[str]] = list  # see NodeBundles.settled

    def note(self, task: Any) -> Any:
        if isinstance(task, dict):
            self.targets.update(str(t) for t in task.get("targets", ()))
            self.file_dep.update(str(f) for f in task.get("file_dep", ()))
            meta = task.get("meta") or {}
            self.targets.update(meta.get(OUTPUTS, ()))
            if PER_NODE in meta:
                self.settled = meta[PER_NODE].settled
        return task

    def wrap(self, tasks: dict[str, Any]) -> dict[str, Any]:
        return {name: self.creator(make) for name, make in tasks.items()}

    def creator(self, make: Callable[[], Any]) -> Callable[[], Any]:
        @functools.wraps(make)
        def noted() -> Any:
            made = make()
            if isinstance(made, dict):
                return self.note(made)
            return (self.note(t) for t in made)

        return noted


def doit_namespace(site: Site, tasks: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """What doit's loader reads from a dodo file. Under the lock: the config repairs state."""
    from qlimage.tasks.graph import doit_config

    return {"DOIT_CONFIG": {**doit_config(site), "reporter": reporter}, **tasks}


@contextlib.contextmanager
def locked_if_running(site: Site, doit_args: Sequence[str], *, wait: bool) -> Iterator[None]:
    if runs_tasks(doit_args):
        with build_lock(site.paths.bootfiles, wait=wait):
            stamp.claim(site)
            yield
    else:
        yield


def run_graph(
    site: Site,
    doit_args: Sequence[str] = ("run",),
    *,
    wait: bool = True,
    on_success: Callable[[GraphFiles], object] | None = None,
) -> int:
    """Run doit with `doit_args` on the site's graph, under the build lock when it may build.
    A failed task raises TaskFailures (a user error) or TaskCrashed (a bug) once doit is done.
    `on_success` runs under the lock after a run without failures (the build stamp), with the
    files the graph's tasks named."""
    from doit.cmd_base import ModuleTaskLoader
    from doit.doit_cmd import DoitMain

    tasks = planned_tasks(site)
    reporter = Reporter(sys.stdout, {})
    with locked_if_running(site, doit_args, wait=wait):
        named = GraphFiles()
        loader = ModuleTaskLoader(doit_namespace(site, named.wrap(tasks), reporter))
        status = DoitMain(loader).run(list(doit_args))
        pieces.of(site).save()  # what the tasks made of each host, for the next build
        if runs_tasks(doit_args):
            # Before the stamp: it records the directories' stat keys. Node generations are
            # clamped when written; trusted outputs hold no other (10,000 lstat's saved).
            clamp_served_dirs(Layout(site).nodes() if stamp.outputs_trusted() else None)
        if on_success and not status and not reporter.crashes and not reporter.problems:
            on_success(named)
    reporter.raise_failures()
    # forget, ignore and friends return None on success; doit has printed its own usage errors.
    return 2 if status == DOIT_USAGE_ERROR else int(status or 0)


def dodo_namespace(site: Site, doit_args: Sequence[str]) -> dict[str, Any]:
    """For a dodo.py: the graph's namespace, with the build lock taken and held until doit
    exits when doit is about to run tasks (the lock is released with the process)."""
    tasks = planned_tasks(site)
    lock = locked_if_running(site, doit_args, wait=True)
    lock.__enter__()  # deliberately never exited: the process end releases the flock
    return doit_namespace(site, tasks, Reporter(sys.stdout, {}, echo=True))
