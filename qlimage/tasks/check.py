"""Everything that can be checked before any task runs.

`qlimage validate` runs all of it (`check_site`); every build runs the cheap part before doit
starts (`check_build`, through `tasks.run`), so a problem that can be found before building is
reported before anything is built, as one line per problem naming its file, exit status 2.
What is left to the tasks (a tool that fails, a download) is reported the same way by
`tasks.run`'s reporter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from doit.tools import config_changed

from qlimage.errors import ConfigError, QlimageError
from qlimage.layout import Layout
from qlimage.pool.packages import load_control_cache, read_control
from qlimage.serve.values import config_path
from qlimage.site import Site
from qlimage.tasks.graph import Plan, plan, read_state, task_kernel

KERNEL_DEB = "site.toml: .kernel.deb"
KERNEL_PACKAGE = "site.toml: .kernel.package"


def check_site(site: Site) -> Plan:
    """All of it: the build's checks, every node's bundle rendered (a build renders only the
    nodes that changed, inside their tasks) and the kernel package looked up in the archive.
    ConfigError lists every problem."""
    problems: list[str] = []
    p = collect(problems, lambda: check_build(site, archive=False))
    problems += bundle_problems(site)
    if not problems:  # the one slow check (reading the archive index) only for a sound site
        problems += archive_kernel_problems(site)
    if problems:
        raise ConfigError(problems)
    assert p is not None
    return p


def check_build(site: Site, *, archive: bool | None = None) -> Plan:
    """What every build checks before any task: the plan (every image's modules, overlays and
    root password), the local kernel .deb and, when the kernel task is due (or `archive`), the
    kernel package in the archive. ConfigError lists every problem."""
    problems: list[str] = []
    # The head configs name paths below bootfiles/: a path they cannot carry fails every build,
    # so it fails before the plan and the archive lookup, not when the configs are rendered.
    collect(problems, lambda: config_path(Layout(site).head_run))
    # Seeded first so that the kernel .deb's control data lands in the cache the plan saves:
    # a no-op build then reads no .deb at all.
    load_control_cache(Layout(site).pool_cache)
    problems += local_kernel_problems(site)
    p = collect(problems, lambda: plan(site))
    due = kernel_due(site) if archive is None else archive
    if not problems and due:
        problems += archive_kernel_problems(site)
    if problems:
        raise ConfigError(problems)
    assert p is not None
    return p


def collect(problems: list[str], check: Any) -> Any:
    """`check()`'s result, or None with its problems appended."""
    try:
        return check()
    except ConfigError as e:
        problems += e.problems
    except QlimageError as e:
        problems.append(str(e))
    return None


def bundle_problems(site: Site) -> list[str]:
    from qlimage.bundle.render import render_bundle

    problems: list[str] = []
    for host in site.hosts:
        collect(problems, lambda host=host: render_bundle(site, host))
    return problems


def local_kernel_problems(site: Site) -> list[str]:
    """site.toml's `kernel.deb` must be a readable package (its control data is cached)."""
    if site.kernel_deb is None:
        return []
    try:
        read_control(site.kernel_deb)
    except QlimageError as e:
        return [f"{KERNEL_DEB}: {e}"]
    return []


def archive_kernel_problems(site: Site) -> list[str]:
    """site.toml's `kernel.package` must be in the archive (reading its index takes seconds,
    which the kernel task then reuses: the archive client is one per process)."""
    if site.kernel_deb is not None:
        return []
    from qlimage.pool.mirror import open_archive  # pulls in requests

    try:
        open_archive(site).package(site.kernel_package)
    except QlimageError as e:
        return [f"{KERNEL_PACKAGE}: {e}"]
    return []


def kernel_due(site: Site) -> bool:
    """Whether this build will fetch the kernel: its output is missing, or doit holds no record
    of it built with today's settings. So a no-op build never reads the archive index."""
    task = task_kernel(site)
    if not all(Path(t).exists() for t in task["targets"]):
        return True
    values = recorded_values(Layout(site).doit_state, "kernel")
    checks = [u for u in task.get("uptodate", []) if isinstance(u, config_changed)]
    return not all(check(None, values) for check in checks)


def recorded_values(state: Path, task: str) -> dict[str, Any]:
    """The values doit saved for `task` at its last success (its JSON backend: a torn or
    missing file is no record)."""
    try:
        values = read_state(state)[task]["_values_:"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return values if isinstance(values, dict) else {}
