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

from qlimage import contract, pieces, templates
from qlimage.errors import QlimageError
from qlimage.layout import Layout
from qlimage.serve import values
from qlimage.site import Host, Site, addresses_on

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
    return [Client(cidr, why) for cidr, why in client_rows(site)]


def client_rows(site: Site) -> list[tuple[str, str]]:
    """clients() as (CIDR, why) pairs: one for each of 10,000 nodes costs a tenth of a
    Client, and each node's is kept between builds (qlimage.pieces)."""
    rows = [(LOOPBACK, "loopback")]
    rows += [(values.cidr(n), "admin network") for n in site.admin_networks]
    boot = site.boot_network.name
    cidrs, whys = pieces.of(site).made("nginx", boot, 2, lambda hosts: node_rows(hosts, boot))
    rows += zip(cidrs, whys, strict=True)
    return rows


def node_rows(hosts: list[Host], boot: str) -> list[tuple[str, str]]:
    """Each host's row, the values checked a column at a time (values.checked)."""
    addrs = [a.address for a in addresses_on(hosts, boot)]
    addrs = values.checked(addrs, values.CANONICAL_IPV4, values.ipv4)
    names = values.checked([h.name for h in hosts], values.HOSTNAME, values.hostname)
    return [(f"{a}/32", f"node {n}") for a, n in zip(addrs, names, strict=True)]


def geo_lines(rows: list[tuple[str, str]]) -> str:
    """The geo block's entries, one a line: built here, not by a loop in the template (ten
    times the cost at 10,000 nodes)."""
    return "\n".join([f"        {cidr} 1;  # {why}" for cidr, why in rows])


def render(site: Site) -> str:
    return render_for(site, client_rows(site))


def render_for(site: Site, rows: list[tuple[str, str]]) -> str:
    """render() with the client_rows(site) the caller already has (head.configs)."""
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
        geo_lines=geo_lines(rows),
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
