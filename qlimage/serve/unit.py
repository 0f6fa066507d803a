"""The systemd unit that runs `qlimage serve` on a head node: dnsmasq, nginx and ql-mcastd
under one service, started after the network is up, restarted when it fails, stopped with
SIGTERM (which `qlimage serve` turns into stopping and reaping every daemon).

The admin links it once (`systemctl link`, then `systemctl enable --now`); the build keeps it
up to date beside the configs it serves.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qlimage import templates
from qlimage.layout import Layout
from qlimage.serve import values
from qlimage.site import Site


def render(site: Site, python: str = sys.executable) -> str:
    # Both paths reach ExecStart: SAFE_PATH excludes white space, quotes, `;`, `$`, `\` and `%`,
    # everything systemd would split, expand or read as a specifier.
    return templates.render(
        "serve/qlimage-serve.service.j2",
        # The one free-text value: `%` would be a specifier; the schema keeps it on one line.
        site_name=site.name.replace("%", "%%"),
        unit_path=values.config_path(Layout(site).serve_unit),
        python=values.config_path(Path(python)),
        site_root=values.config_path(site.paths.root),
    )
