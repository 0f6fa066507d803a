"""The head's nginx config: the qlustar tree, read-only, to registered nodes and admins only.

Images carry the root password hash (SECURITY.md), so the server answers only the boot
addresses of the nodes in nodes.d, the site's `[head] admin_networks` and loopback; everyone
else gets 403. The allow list is a `geo` block (a radix tree: one lookup per request however
many nodes), not thousands of `allow` lines walked in order.

Sized for a boot storm: sendfile, enough connections and file descriptors for thousands of
nodes downloading at once. Everything it writes (pid, logs, temp files) goes below
bootfiles/head/run/, so it also runs unprivileged (tests).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from qlimage import contract, templates
from qlimage.errors import QlimageError
from qlimage.layout import Layout
from qlimage.serve import values
from qlimage.site import Site

WORKER_CONNECTIONS = 16384  # per worker: a few thousand nodes, each with a connection or two
RLIMIT_NOFILE = 65536  # >= 2 x worker_connections: a served file is a descriptor too
USER = "www-data"  # workers drop to it when nginx starts as root (Debian's web server user)
PID = "nginx.pid"
ACCESS_LOG = "access.log"
ERROR_LOG = "error.log"
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
LOOPBACK = "127.0.0.0/8"


@dataclass(frozen=True)
class Client:
    cidr: str
    why: str  # the comment: which node or setting allowed it


def clients(site: Site) -> list[Client]:
    """Who may fetch: loopback, the admin networks, every registered node's boot address."""
    out = [Client(LOOPBACK, "loopback")]
    out += [Client(values.cidr(n), "admin network") for n in site.admin_networks]
    out += [
        Client(values.ipv4(site.boot_address(h)) + "/32", f"node {values.hostname(h.name)}")
        for h in site.hosts
    ]
    return out


def render(site: Site) -> str:
    layout = Layout(site)
    run_dir = values.config_path(layout.head_run)
    return templates.render(
        "serve/nginx.conf.j2",
        site_name=site.name,
        user=USER,
        rlimit_nofile=RLIMIT_NOFILE,
        worker_connections=WORKER_CONNECTIONS,
        run_dir=run_dir,
        pid=PID,
        access_log=ACCESS_LOG,
        error_log=ERROR_LOG,
        temp_dirs=TEMP_DIRS,
        listen=f"{values.ipv4(site.head_address)}:{int(site.http_port)}",
        bootfiles=values.config_path(layout.bootfiles),
        location=f"/{contract.QLUSTAR_DIR}/",
        clients=clients(site),
    )


# --- the access log ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """One request, as the `qlimage` log format writes it (escape=json: one JSON object)."""

    time: float  # seconds since the epoch, millisecond resolution
    address: str
    path: str
    status: int
    bytes: int


def parse_access(line: str) -> Access:
    try:
        raw: dict[str, Any] = json.loads(line)
        return Access(
            float(raw["time"]),
            str(raw["addr"]),
            str(raw["uri"]),
            int(raw["status"]),
            int(raw["bytes"]),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise QlimageError(f"not a qlimage access log line ({e}): {line[:200]!r}") from None
