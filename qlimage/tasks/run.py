"""The ONE place that takes the build lock and runs doit on a site's graph.

`qlimage build`, `qlimage doit`, the apt hook and every future command call `run_graph`; a
`dodo.py` (doit itself running) calls `dodo_namespace`. Both decide about the lock with
`runs_tasks`, so builds of one site never overlap, whichever command started them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from qlimage.image.publish import build_lock
from qlimage.site import Site

# doit commands that only read the graph (or forget its state); anything else may run tasks.
READ_ONLY_DOIT = frozenset(
    {"list", "info", "help", "dumpdb", "tabcompletion", "graph", "forget", "ignore"}
)


def runs_tasks(doit_args: Sequence[str]) -> bool:
    """Whether these doit arguments may run tasks (and so need the build lock)."""
    command = next((a for a in doit_args if not a.startswith("-")), "run")
    return command not in READ_ONLY_DOIT


def planned_tasks(site: Site) -> dict[str, Any]:
    """The `task_*` creators, planned before the lock and before doit starts: a site whose
    images cannot be resolved fails with one-line errors and creates nothing."""
    from qlimage.tasks.graph import site_tasks

    return site_tasks(site)


def doit_namespace(site: Site, tasks: dict[str, Any]) -> dict[str, Any]:
    """What doit's loader reads from a dodo file. Under the lock: the config repairs state."""
    from qlimage.tasks.graph import doit_config

    return {"DOIT_CONFIG": doit_config(site), **tasks}


@contextlib.contextmanager
def locked_if_running(site: Site, doit_args: Sequence[str], *, wait: bool) -> Iterator[None]:
    if runs_tasks(doit_args):
        with build_lock(site.paths.bootfiles, wait=wait):
            yield
    else:
        yield


def run_graph(site: Site, doit_args: Sequence[str] = ("run",), *, wait: bool = True) -> int:
    """Run doit with `doit_args` on the site's graph, under the build lock when it may build."""
    from doit.cmd_base import ModuleTaskLoader
    from doit.doit_cmd import DoitMain

    tasks = planned_tasks(site)
    with locked_if_running(site, doit_args, wait=wait):
        loader = ModuleTaskLoader(doit_namespace(site, tasks))
        return int(DoitMain(loader).run(list(doit_args)))


def dodo_namespace(site: Site, doit_args: Sequence[str]) -> dict[str, Any]:
    """For a dodo.py: the graph's namespace, with the build lock taken and held until doit
    exits when doit is about to run tasks (the lock is released with the process)."""
    tasks = planned_tasks(site)
    lock = locked_if_running(site, doit_args, wait=True)
    lock.__enter__()  # deliberately never exited: the process end releases the flock
    return doit_namespace(site, tasks)
