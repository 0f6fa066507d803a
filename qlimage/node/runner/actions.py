"""The bundle's actions (hostname, IPMI, commands, ensured lines) and the init.d scripts."""

from __future__ import annotations

import os
import shlex
import stat
from collections.abc import Sequence

from . import paths
from .apply import write_file
from .bundle import Action, CommandAction, EnsureLineAction, HostnameAction, IpmiAction
from .commands import Runner, find_program, run_logged
from .report import Reporter, append_file, create_log_dir


def set_hostname(action: HostnameAction, run: Runner, reporter: Reporter) -> bool:
    # The inventory names the node: actions run after the files, so this replaces whatever
    # /etc/hostname the bundle's files held (the head refuses a Root FS tree that has one).
    write_file(paths.HOSTNAME_FILE, f"{action.name}\n".encode(), 0o644, 0, 0)
    reporter.detail(f"wrote {paths.HOSTNAME_FILE} ({action.name})")
    if find_program("hostname") is None:
        # systemd sets the kernel host name from /etc/hostname later anyway.
        reporter.detail("hostname command not found; kernel host name left to systemd")
        return True
    return run_logged(["hostname", action.name], run, reporter, "hostname") == 0


def configure_ipmi(action: IpmiAction, run: Runner, reporter: Reporter) -> bool | None:
    if find_program("ipmitool") is None:
        reporter.warn(f"ipmitool not found: IPMI address {action.address} not configured")
        return None
    lan = ["ipmitool", "lan", "set", str(action.channel)]
    steps = [["ipsrc", "static"], ["ipaddr", action.address], ["netmask", action.netmask]]
    if action.gateway:
        steps.append(["defgw", "ipaddr", action.gateway])
    else:
        reporter.detail(f"no IPMI gateway: default gateway of channel {action.channel} unchanged")
    # Stops at the first failure: later settings make no sense once one failed (e.g. the
    # BMC did not answer).
    return all(run_logged([*lan, *args], run, reporter, "ipmitool") == 0 for args in steps)


def run_action_command(action: CommandAction, run: Runner, reporter: Reporter) -> bool | None:
    if action.if_exists is not None and not os.path.exists(action.if_exists):
        # Expected on nodes whose image lacks the program (e.g. no postfix): no warning.
        reporter.step(f"{action.if_exists} not on this node: {shlex.join(action.argv)} not run")
        return None
    return run_logged(action.argv, run, reporter, os.path.basename(action.argv[0])) == 0


def ensure_line(action: EnsureLineAction, reporter: Reporter) -> bool | None:
    """Append the line (after a newline, if the file lacks a final one) and replace the file
    atomically with its mode and owner kept. A symlink is followed: its target is edited."""
    path = os.path.realpath(action.path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        reporter.warn(f"{action.path} does not exist: line {action.line!r} not added")
        return None
    if not stat.S_ISREG(st.st_mode):
        reporter.detail(f"{action.path} is not a regular file")
        return False
    with open(path, "rb") as f:
        data = f.read()
    line = action.line.encode("utf-8")
    if line in data.split(b"\n"):
        reporter.detail(f"{action.path} already has the line {action.line!r}")
        return True
    if data and not data.endswith(b"\n"):
        data += b"\n"
    write_file(path, data + line + b"\n", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    reporter.detail(f"added the line {action.line!r} to {path}")
    return True


def describe_action(action: Action) -> str:
    if isinstance(action, HostnameAction):
        return f"hostname {action.name}"
    if isinstance(action, IpmiAction):
        return f"ipmi {action.address} (channel {action.channel})"
    if isinstance(action, EnsureLineAction):
        return f"ensure-line {action.path}"
    return f"command {action.description or shlex.join(action.argv)}"


def perform_action(action: Action, run: Runner, reporter: Reporter) -> bool | None:
    """True: done; False: failed; None: skipped (the reason is logged)."""
    if isinstance(action, HostnameAction):
        return set_hostname(action, run, reporter)
    if isinstance(action, IpmiAction):
        return configure_ipmi(action, run, reporter)
    if isinstance(action, EnsureLineAction):
        return ensure_line(action, reporter)
    return run_action_command(action, run, reporter)


def perform_actions(actions: Sequence[Action], run: Runner, reporter: Reporter) -> int:
    """Perform every action; a failure is reported and the rest still run. Returns the
    number of failed actions."""
    failed = 0
    for action in actions:
        what = describe_action(action)
        try:
            result = perform_action(action, run, reporter)
        except OSError as e:
            reporter.detail(f"{what}: {e}")
            result = False
        if result is False:
            failed += 1
            reporter.step(f"action {what} FAILED")
        elif result:
            reporter.step(f"action {what} done")
        else:
            reporter.step(f"action {what} skipped")
    return failed


def list_init_scripts(reporter: Reporter) -> list[str]:
    """Names of the runnable scripts, byte-wise sorted (as `LC_ALL=C ls` and run-parts);
    non-executables, directories and hidden (editor/temp) files are skipped."""
    try:
        names = os.listdir(paths.INIT_D_DIR)
    except FileNotFoundError:
        reporter.detail(f"no {paths.INIT_D_DIR}")
        return []
    scripts = []
    for name in sorted(names, key=os.fsencode):
        path = os.path.join(paths.INIT_D_DIR, name)
        try:
            st = os.stat(path)
        except OSError as e:
            reporter.detail(f"init.d {name} skipped: {e.strerror}")
            continue
        if name.startswith("."):
            reporter.detail(f"init.d {name} skipped: hidden file")
        elif not stat.S_ISREG(st.st_mode):
            reporter.detail(f"init.d {name} skipped: not a regular file")
        elif not st.st_mode & 0o111:  # root may execute anything with an x bit
            reporter.detail(f"init.d {name} skipped: not executable")
        else:
            scripts.append(name)
    return scripts


def run_init_scripts(run: Runner, reporter: Reporter) -> tuple[int, int]:
    """Run each script in order; one failing does not stop the others.
    Returns (scripts run, scripts failed)."""
    scripts = list_init_scripts(reporter)
    log_dir = os.path.join(paths.LOG_DIR, "init.d")
    if scripts:
        try:
            create_log_dir(log_dir)
        except OSError as e:
            reporter.warn(f"cannot create {log_dir}: {e}")
    failed = 0
    for name in scripts:
        reporter.step(f"init.d {name} started")
        status, output = run([os.path.join(paths.INIT_D_DIR, name)])
        try:
            append_file(os.path.join(log_dir, f"{name}.log"), output)
        except OSError as e:
            reporter.detail(f"cannot write {log_dir}/{name}.log: {e}")
        reporter.output(name, output)
        reporter.step(f"init.d {name} exited with status {status}")
        failed += status != 0
    return len(scripts), failed
