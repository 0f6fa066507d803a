"""Setting the clock from the head before anything else (the bundle's time option).

The bundle's `/etc/qlustar/options.d/time` names the servers; the runner reads it from the
verified bundle, before it writes any file, and makes ONE bounded attempt with whatever NTP
client the image carries: `chronyd -q` (with its own timeout, one sample per server), else
`ntpd -n -q` (busybox's or a stand-alone one, under `timeout`). Each outcome is one
`qlustar: time: ...` console line; a head that does not answer, or an image without a client,
never stops the boot.
"""

from __future__ import annotations

import re
import shlex

from . import paths
from .bundle import Bundle
from .commands import Runner, find_program, run_captured
from .report import Reporter

# A host name or IPv4 address (the head's schema allows no more): never an option to a client.
_SERVER = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*$")


def read_time_settings(bundle: Bundle) -> dict[str, str] | None:
    """KEY=value lines of the bundle's time file (values shell-quoted), or None without one."""
    entry = next((e for e in bundle.files if e.path == paths.TIME_FILE and e.data), None)
    if entry is None or entry.data is None:
        return None
    settings = {}
    for line in entry.data.decode("utf-8", errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            try:
                settings[key] = " ".join(shlex.split(value))
            except ValueError:
                settings[key] = ""
    return settings


def busybox_has(applet: str, run: Runner) -> bool:
    # Debian's busybox has no ntpd applet; `busybox --list` says which applets it has.
    if find_program("busybox") is None:
        return False
    status, output = run(["busybox", "--list"])
    return status == 0 and applet in output.split()


def sync_argv(servers: list[str], run: Runner) -> list[str] | None:
    """The bounded command setting the clock once from `servers`, or None: no client."""
    seconds = str(paths.TIME_SYNC_TIMEOUT)
    if find_program("chronyd") is not None:
        # Directives on the command line: chronyd reads no configuration file. `-u root`: its
        # own user comes from sysusers.d, which runs under systemd, after us, and this chronyd
        # exits once the clock is set. `maxsamples 1`: one answer is enough for the step (the
        # running daemon refines it), 0.2 s instead of the 4 s that iburst's 4 samples take.
        directives = [f"server {s} iburst maxsamples 1" for s in servers]
        return ["chronyd", "-q", "-u", "root", "-t", seconds, *directives]
    peers = [arg for s in servers for arg in ("-p", s)]
    if find_program("ntpd") is not None:
        ntpd = ["ntpd", "-n", "-q", *peers]
    elif busybox_has("ntpd", run):
        ntpd = ["busybox", "ntpd", "-n", "-q", *peers]
    else:
        return None
    if find_program("timeout") is not None:
        return ["timeout", "-s", "KILL", seconds, *ntpd]
    if busybox_has("timeout", run):
        return ["busybox", "timeout", "-s", "KILL", seconds, *ntpd]
    return None  # an unbounded ntpd could hang the boot when the head does not answer


def sync_clock(bundle: Bundle, run: Runner, reporter: Reporter) -> bool | None:
    """True: clock set; False: no server answered; None: not attempted (reason logged)."""
    settings = read_time_settings(bundle)
    if settings is None:
        return None
    servers = settings.get("TIME_SERVERS", "").split()
    if settings.get("TIME_SYNC_AT_BOOT") != "yes" or not servers:
        reporter.step("time: setting the clock at boot is off for this node")
        return None
    bad = [s for s in servers if not _SERVER.match(s)]
    if bad:
        reporter.step(f"time: invalid server {bad[0]!r} in {paths.TIME_FILE}; clock not set")
        return False
    argv = sync_argv(servers, run)
    if argv is None:
        reporter.step(
            "time: no NTP client (chronyd, ntpd, busybox ntpd) on this node; clock not set"
        )
        return None
    status, output = run_captured(argv, run, reporter, "time")
    names = ", ".join(servers)
    client = "chronyd" if "chronyd" in argv else "ntpd"
    if status == 0:
        reporter.step(f"time: clock set from {names} (via {client})")
        return True
    # `timeout` kills ntpd (124/137); chronyd stops itself at -t and says so.
    silent = status in (124, 137) or "Timeout reached" in output
    why = "no answer" if silent else f"exit status {status}"
    reporter.step(
        f"time: clock NOT set: {why} from {names} within {paths.TIME_SYNC_TIMEOUT}s "
        f"({client}); the boot goes on with the clock as it is"
    )
    return False
