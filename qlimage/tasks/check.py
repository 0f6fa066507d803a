"""Everything that can be checked before any task runs: `qlimage validate` runs all of it."""

from __future__ import annotations

from qlimage.errors import ConfigError, QlimageError
from qlimage.site import Site
from qlimage.tasks.graph import Plan, plan


def check_site(site: Site) -> Plan:
    """Resolve every image's modules and render every node's bundle; ConfigError lists every
    problem. (A build renders only the nodes that changed.)"""
    from qlimage.bundle.render import render_bundle

    p = plan(site)  # resolves every image's modules: unknown modules fail here
    problems: list[str] = []
    for host in site.hosts:
        try:
            render_bundle(site, host)
        except QlimageError as e:
            problems += e.problems if isinstance(e, ConfigError) else [str(e)]
    if problems:
        raise ConfigError(problems)
    return p
