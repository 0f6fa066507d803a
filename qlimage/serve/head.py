"""The head's boot services for a site: dnsmasq (DHCP, TFTP), nginx (HTTP), ql-mcastd.

`configs` renders their configs and the systemd unit that runs `qlimage serve` (the
`headconfig` task writes them below bootfiles/head/); `check` runs
the daemons' own config tests; `serve` runs both in the foreground until SIGINT or SIGTERM and
always stops and reaps them.
"""

from __future__ import annotations

import errno
import hashlib
import socket
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from qlimage import run
from qlimage.atomic import write_text_if_changed
from qlimage.errors import QlimageError
from qlimage.layout import Layout
from qlimage.serve import dnsmasq, mcastd, nginx, unit
from qlimage.site import Site

POLL = 0.2  # seconds between checks that both daemons still run
CHECK_TIMEOUT = 60.0


def configs(site: Site) -> dict[Path, str]:
    """{config file: its text} for every head service."""
    layout = Layout(site)
    clients = nginx.client_rows(site)  # who may fetch may ask for multicast: made once
    return {
        layout.dnsmasq_conf: dnsmasq.render(site),
        layout.nginx_conf: nginx.render_for(site, clients),
        mcastd.config_path(site): mcastd.render_for(site, [cidr for cidr, _ in clients]),
        layout.serve_unit: unit.render(site),
    }


def digest(rendered: dict[Path, str]) -> str:
    """What the task's config_changed stores: the rendered bytes, not a copy of them."""
    h = hashlib.sha256()
    for path, text in sorted(rendered.items()):
        h.update(f"{path}\0{text}\0".encode())
    return h.hexdigest()


def write_configs(rendered: dict[Path, str]) -> None:
    for path, text in rendered.items():
        write_text_if_changed(path, text)


def describe(site: Site) -> str:
    """Every head config as `qlimage serve --print-config` shows it."""
    root = Layout(site).bootfiles.parent
    parts = []
    for path, text in configs(site).items():
        name = path.relative_to(root) if path.is_relative_to(root) else path
        parts.append(f"==> {name} <==\n{text}")
    return "\n".join(parts)


def require_configs(site: Site) -> Layout:
    layout = Layout(site)
    for path in (layout.dnsmasq_conf, layout.nginx_conf):
        if not path.is_file():
            raise QlimageError(f"{path}: missing; run qlimage build first")
    layout.head_run.mkdir(parents=True, exist_ok=True)
    return layout


def dnsmasq_test(layout: Layout) -> list[str]:
    return ["dnsmasq", "--test", "-C", str(layout.dnsmasq_conf)]


def nginx_args(layout: Layout) -> list[str]:
    # -e: nginx opens its error log before it reads the config; keep that one in run/ too.
    return [
        "nginx",
        "-c",
        str(layout.nginx_conf),
        "-p",
        f"{layout.head_run}/",
        "-e",
        str(layout.head_run / nginx.ERROR_LOG),
    ]


def mcastd_args(site: Site) -> list[str]:
    # Our own interpreter, not the console script: `qlimage` may run from a venv not on PATH.
    return [sys.executable, "-m", "qlimage.serve.mcastd", "--config", str(mcastd.config_path(site))]


def check(site: Site) -> list[str]:
    """Both daemons' config tests; BuildError names the one that refused its config."""
    layout = require_configs(site)
    done = []
    for argv in (dnsmasq_test(layout), [*nginx_args(layout), "-t", "-q"]):
        run.run(argv, timeout=CHECK_TIMEOUT)
        done.append(" ".join(argv[:2]) if argv[0] == "dnsmasq" else "nginx -t")
    return done


def check_port_free(site: Site) -> None:
    """A taken HTTP port fails here in one clear line, not deep in nginx's error log."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((site.head_address, site.http_port))
        except OSError as e:
            why = "is taken" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
            raise QlimageError(
                f"{site.head_address}:{site.http_port} {why}: nginx cannot serve there",
                hint="stop the other server or set head.http_port in site.toml",
            ) from None


def serve(
    site: Site,
    *,
    ready: Callable[[], None] | None = None,
    until: Callable[[], bool] | None = None,
) -> int:
    """Run dnsmasq and nginx until SIGINT/SIGTERM (or `until()`), then stop both.

    Their logs go to our stderr (dnsmasq) and bootfiles/head/run/ (nginx). A daemon that exits
    on its own (a taken port, a missing interface) stops the other and ends serving with one
    line naming it."""
    layout = require_configs(site)
    check_port_free(site)
    with run.sigterm_stops(), ExitStack() as stack:
        try:
            daemons = {
                "dnsmasq": stack.enter_context(
                    run.spawn(["dnsmasq", "-k", "--log-facility=-", "-C", str(layout.dnsmasq_conf)])
                ),
                "nginx": stack.enter_context(run.spawn([*nginx_args(layout), "-g", "daemon off;"])),
            }
            if site.multicast.enabled:
                daemons["ql-mcastd"] = stack.enter_context(run.spawn(mcastd_args(site)))
            if ready is not None:
                ready()
            while until is None or not until():
                for name, proc in daemons.items():
                    if proc.poll() is not None:
                        raise QlimageError(exit_message(layout, name, proc.returncode))
                time.sleep(POLL)
        except (KeyboardInterrupt, run.Stopped):
            pass
    return 0


def exit_message(layout: Layout, name: str, status: int) -> str:
    where = "its error is above"
    if name == "nginx":
        log = layout.head_run / nginx.ERROR_LOG
        lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
        where = lines[-1] if lines else f"see {log}"
    return f"{name} exited with status {run.status_text(status)} ({where})"
