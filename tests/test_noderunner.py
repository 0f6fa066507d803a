"""Tests for the boot-time node runner (qlimage/node/runner, installed as qlustar-runner).

Most tests run the runner against a pyfakefs node file system with allow_root_user=False:
the tests run as root, but the fake file system then enforces permissions as for a normal
user (uid 1), so e.g. a directory finalized as 0700 root:root really blocks later writes.
Assertions look at the result as root again (`as_root`).  Users and groups of the node
are a fake pwd/grp database; the head is a dict of URLs; commands are simulated by an
injected runner.  One test runs real shell scripts through the real subprocess runner.
"""

from __future__ import annotations

import ast
import base64
import functools
import hashlib
import json
import os
import pwd
import stat
import sys
import threading
import time
import urllib.error
from collections.abc import Sequence
from email.message import Message
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pyfakefs.fake_filesystem import FakeFilesystem

from qlimage.bundle import render as qb
from qlimage.node.runner import apply as node_apply
from qlimage.node.runner import bundle as node_bundle
from qlimage.node.runner import disk as node_disk
from qlimage.node.runner import fetch as node_fetch
from qlimage.node.runner import paths as node_paths
from qlimage.node.runner.commands import run_command
from qlimage.node.runner.identity import mac_from_bootif, parse_cmdline, parse_net_env
from qlimage.node.runner.main import EXIT_OK, EXIT_PARTIAL, EXIT_UNCONFIGURED, main
from qlimage.node.runner.report import Reporter
from qlimage.site import load_site

from fake_node import (
    BASE,
    BUNDLE_URL,
    CMDLINE,
    FAKE_UID,
    MAC_DASHED,
    NET_ENV,
    RUNNER_LAUNCHER,
    Commands,
    Head,
    as_root,
    console_lines,
    dir_entry,
    executable,
    fake_node,
    file_entry,
    link_entry,
    make_bundle,
    node_mode,
    node_owner,
    node_read,
    node_stat,
    run_node,
    runner_log,
    snapshot,
)
from helpers import make_site

pytestmark = pytest.mark.usefixtures("node_env")

# --------------------------------------------------------------------------------------
# The runner is copied verbatim into the node image


def test_is_a_standalone_stdlib_program() -> None:
    source = RUNNER_LAUNCHER.read_text()
    assert source.startswith("#!/usr/bin/python3\n")
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0
            imported.add((node.module or "").split(".")[0])
    assert "qlimage" not in imported
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}


# --------------------------------------------------------------------------------------
# Identity parsing


def test_parse_cmdline_and_bootif() -> None:
    params = parse_cmdline(CMDLINE + " debug early-shell")
    assert params["qlustar.http"] == BASE
    assert "debug" in params and "early-shell" in params
    assert mac_from_bootif(params["BOOTIF"]) == "52:54:00:12:34:56"
    assert mac_from_bootif("52-54-00-AB-CD-EF") == "52:54:00:ab:cd:ef"
    assert mac_from_bootif("01-52-54-00-12") is None
    assert mac_from_bootif("01-52-54-00-12-34-zz") is None


def test_parse_net_env_unquotes_values() -> None:
    env = parse_net_env(NET_ENV + "\n# comment\nBROKEN='x\n")
    assert env["NIC"] == "eth0"
    assert env["DNS"] == "10.0.2.3 10.0.2.4"
    assert env["HOSTNAME"] == "beo-01"
    assert env["BROKEN"] == "'x"


# --------------------------------------------------------------------------------------
# Applying the bundle


def test_applies_every_entry_type(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    blob = bytes(range(256))
    digest = head.publish(
        make_bundle(
            [
                dir_entry("/root/.ssh", "0700"),
                file_entry("/root/.ssh/authorized_keys", "ssh-ed25519 AAAA admin\n", mode="0600"),
                file_entry("/etc/qlustar/options.d/opensm", "OPENSM=no\n"),
                file_entry("/usr/lib/blob.bin", base64.b64encode(blob).decode(), encoding="base64"),
                file_entry("/etc/systemd/system/srv-data.mount", "[Mount]\n"),
                link_entry(
                    "/etc/systemd/system/remote-fs.target.wants/srv-data.mount",
                    "/etc/systemd/system/srv-data.mount",
                ),
            ]
        )
    )

    assert run_node(head, commands) == EXIT_OK

    # ... and then the cluster files' sums, which this head does not serve (test_cluster_files.py)
    assert head.requests == [BUNDLE_URL, BUNDLE_URL + ".sha256", f"{BASE}/cluster/SHA256SUMS"]
    assert node_read("/root/.ssh/authorized_keys") == b"ssh-ed25519 AAAA admin\n"
    assert node_mode("/root/.ssh") == "0700"
    assert node_mode("/root/.ssh/authorized_keys") == "0600"
    assert stat.S_ISDIR(node_stat("/root/.ssh").st_mode)
    assert node_owner("/root/.ssh") == node_owner("/root/.ssh/authorized_keys") == (0, 0)
    assert node_read("/etc/qlustar/options.d/opensm") == b"OPENSM=no\n"
    assert node_read("/usr/lib/blob.bin") == blob
    link = "/etc/systemd/system/remote-fs.target.wants/srv-data.mount"
    assert stat.S_ISLNK(node_stat(link).st_mode)
    with as_root():
        assert os.readlink(link) == "/etc/systemd/system/srv-data.mount"
        assert Path(link).read_text() == "[Mount]\n"
    assert node_owner(link) == (0, 0)
    # Parents missing on the node are created 0755 root:root.
    for parent in ("/etc/qlustar", "/etc/qlustar/options.d", "/usr/lib", os.path.dirname(link)):
        assert node_mode(parent) == "0755"
        assert node_owner(parent) == (0, 0)
    # Image directories that were not in the bundle keep their owner.
    assert node_owner("/etc/systemd/system") == (FAKE_UID, FAKE_UID)
    # No temporary files are left behind.
    with as_root():
        leftovers = [p for p, _, names in os.walk("/") for n in names if "qlustar-tmp" in n]
    assert leftovers == []
    out = console_lines(capsys)
    assert out[0] == (f"qlustar: runner started (node MAC 52:54:00:12:34:56, head {BASE})")
    assert f"qlustar: bundle applied: 6 files (sha256 {digest[:12]})" in out
    assert out[-1] == (
        "qlustar: runner done: 6 files, 0 actions (0 failed), "
        "0 disks (0 failed), 0 scripts (0 failed)"
    )


def test_owner_and_group_by_name_with_numeric_fallback(
    nodefs: FakeFilesystem, head: Head, commands: Commands
) -> None:
    head.publish(
        make_bundle(
            [
                # Known on the node: the node's ids win over the head's.
                file_entry(
                    "/etc/munge/munge.key",
                    "k",
                    mode="0400",
                    owner="munge",
                    group="munge",
                    uid=998,
                    gid=997,
                ),
                # Unknown on the node: the head's numeric ids are used, and logged.
                file_entry(
                    "/etc/slurm/slurm.key",
                    "k",
                    mode="0640",
                    owner="slurm",
                    group="slurm",
                    uid=64030,
                    gid=64031,
                ),
                file_entry(
                    "/home/alice/.profile", "x", owner="alice", group="users", uid=5000, gid=5000
                ),
                dir_entry("/srv/scratch", "1777", uid=0, gid=0),
            ]
        )
    )

    assert run_node(head, commands) == EXIT_OK

    assert node_owner("/etc/munge/munge.key") == (105, 106)
    assert node_owner("/etc/slurm/slurm.key") == (64030, 64031)
    assert node_owner("/home/alice/.profile") == (1000, 100)
    log = runner_log()
    assert "user 'slurm' unknown on node, using uid 64030 for /etc/slurm/slurm.key" in log
    assert "group 'slurm' unknown on node, using gid 64031 for /etc/slurm/slurm.key" in log
    assert "'munge' unknown" not in log


def test_special_mode_bits(nodefs: FakeFilesystem, head: Head, commands: Commands) -> None:
    head.publish(
        make_bundle(
            [
                dir_entry("/srv/scratch", "1777"),
                dir_entry("/srv/project", "2775", group="users", gid=100),
                file_entry("/usr/bin/suidtool", "#!/bin/sh\n", mode="4755"),
                file_entry("/usr/bin/sgidtool", "#!/bin/sh\n", mode="2711", group="users"),
                file_entry("/srv/project/README", "x", mode="644"),
            ]
        )
    )

    assert run_node(head, commands) == EXIT_OK

    assert node_mode("/srv/scratch") == "1777"
    assert node_mode("/srv/project") == "2775"
    assert node_mode("/usr/bin/suidtool") == "4755"
    assert node_mode("/usr/bin/sgidtool") == "2711"
    assert node_owner("/usr/bin/sgidtool") == (0, 100)
    assert node_mode("/srv/project/README") == "0644"


def test_existing_directory_gets_mode_and_owner(
    nodefs: FakeFilesystem, head: Head, commands: Commands
) -> None:
    nodefs.create_file("/root/.ssh/known_hosts", contents="old")
    os.chmod("/root/.ssh", 0o777)
    head.publish(make_bundle([dir_entry("/root/.ssh", "0700")]))

    assert run_node(head, commands) == EXIT_OK

    assert node_mode("/root/.ssh") == "0700"
    assert node_owner("/root/.ssh") == (0, 0)
    assert node_read("/root/.ssh/known_hosts") == b"old"


def test_entries_are_applied_in_bundle_order(
    nodefs: FakeFilesystem, head: Head, commands: Commands
) -> None:
    paths = ["/srv/b", "/srv/b/z", "/srv/a", "/srv/b/y", "/srv/link"]
    head.publish(
        make_bundle(
            [
                dir_entry("/srv/b"),
                file_entry("/srv/b/z"),
                file_entry("/srv/a"),
                file_entry("/srv/b/y"),
                link_entry("/srv/link", "a"),
            ]
        )
    )

    assert run_node(head, commands) == EXIT_OK

    log = runner_log()
    positions = [log.index(f" {path} ") for path in paths]
    assert positions == sorted(positions)


def test_replaces_existing_file_and_symlink_atomically(
    nodefs: FakeFilesystem,
    head: Head,
    commands: Commands,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nodefs.create_file("/etc/motd", contents="old motd\n")
    nodefs.create_symlink("/etc/localtime", "/usr/share/zoneinfo/UTC")
    # A file entry must replace a symlink, never write through it.
    nodefs.create_file("/etc/victim", contents="untouched\n")
    nodefs.create_symlink("/etc/issue", "/etc/victim")
    head.publish(
        make_bundle(
            [
                file_entry("/etc/motd", "new motd\n"),
                link_entry("/etc/localtime", "/usr/share/zoneinfo/Europe/Berlin"),
                file_entry("/etc/issue", "Qlustar\n"),
            ]
        )
    )
    real_replace = node_apply.os.replace
    seen: list[tuple[str, str]] = []

    def spy_replace(src: str, dst: str) -> None:
        # At the moment of the rename the old object is still complete in place, and the
        # new one is complete beside it, in the same directory.
        assert os.path.dirname(src) == os.path.dirname(dst)
        if dst == "/etc/motd":
            assert Path(dst).read_text() == "old motd\n"
            assert Path(src).read_text() == "new motd\n"
            assert stat.S_IMODE(os.stat(src).st_mode) == 0o644
        if dst == "/etc/localtime":
            assert os.readlink(dst) == "/usr/share/zoneinfo/UTC"
            assert os.readlink(src) == "/usr/share/zoneinfo/Europe/Berlin"
        seen.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(node_apply.os, "replace", spy_replace)

    assert run_node(head, commands) == EXIT_OK

    assert [dst for _, dst in seen] == ["/etc/motd", "/etc/localtime", "/etc/issue"]
    assert node_read("/etc/motd") == b"new motd\n"
    with as_root():
        assert os.readlink("/etc/localtime") == "/usr/share/zoneinfo/Europe/Berlin"
    assert not stat.S_ISLNK(node_stat("/etc/issue").st_mode)
    assert node_read("/etc/issue") == b"Qlustar\n"
    assert node_read("/etc/victim") == b"untouched\n"
    assert not [n for n in os.listdir("/etc") if "qlustar-tmp" in n]


def test_write_failure_midway_exits_partial(
    nodefs: FakeFilesystem,
    head: Head,
    commands: Commands,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    executable(nodefs, "/lib/qlustar/init.d/10-x")
    head.publish(
        make_bundle(
            [dir_entry("/srv/new", "0750"), file_entry("/srv/new/a"), file_entry("/srv/new/b")],
            [{"kind": "command", "argv": ["/usr/bin/true"]}],
        )
    )
    real_write = node_apply.write_file

    def failing_write(path: str, *args: Any) -> None:
        if path == "/srv/new/b":
            raise OSError(28, "No space left on device")
        real_write(path, *args)

    monkeypatch.setattr(node_apply, "write_file", failing_write)

    assert run_node(head, commands) == EXIT_PARTIAL

    out = capsys.readouterr().out
    assert "qlustar: ERROR: writing the bundle failed: [Errno 28] /srv/new/b:" in out
    assert "actions, disk setup and init.d scripts skipped" in out
    assert commands.calls == []
    # The directory created so far was still finalized (not left 0700).
    assert node_mode("/srv/new") == "0750"


# --------------------------------------------------------------------------------------
# Bad bundles: nothing is written


IPMI = {
    "kind": "ipmi",
    "address": "10.1.0.5",
    "netmask": "255.255.0.0",
    "gateway": "10.1.0.1",
    "channel": 1,
}
PAM_LINE = "account    required     pam_slurm_adopt.so"
ENSURE_LINE = {"kind": "ensure-line", "path": "/etc/pam.d/sshd", "line": PAM_LINE}
PAM_SSHD = "@include common-auth\naccount    required     pam_nologin.so\n@include common-account\n"

VALID_FILES = [
    dir_entry("/root/.ssh", "0700"),
    file_entry("/root/.ssh/authorized_keys", "key\n", mode="0600"),
    file_entry("/etc/qlustar/options.d/node", "NAME=beo-01\n"),
]


def without(entry: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != key}


BAD_BUNDLES: dict[str, tuple[Any, str]] = {
    "format 2": (make_bundle(VALID_FILES, format=2), "unsupported bundle format 2"),
    "format missing": (
        {k: v for k, v in make_bundle(VALID_FILES).items() if k != "format"},
        "unsupported bundle format None",
    ),
    "format true": (make_bundle(VALID_FILES, format=True), "unsupported bundle format True"),
    "relative path": (
        make_bundle([*VALID_FILES, file_entry("etc/motd")]),
        "path 'etc/motd' is not absolute",
    ),
    "dotdot": (
        make_bundle([*VALID_FILES, file_entry("/etc/../root/x")]),
        "contains '..'",
    ),
    "double slash": (
        make_bundle([*VALID_FILES, file_entry("/etc//motd")]),
        "not a normalized file path",
    ),
    "bad mode": (
        make_bundle([*VALID_FILES, file_entry("/etc/motd", mode="0999")]),
        "mode '0999' is not an octal file mode",
    ),
    "numeric mode": (
        make_bundle([*VALID_FILES, {**file_entry("/etc/motd"), "mode": 420}]),
        "field 'mode' must be of type str",
    ),
    "missing mode": (
        make_bundle([*VALID_FILES, without(file_entry("/etc/motd"), "mode")]),
        "files[3] (/etc/motd): missing field 'mode'",
    ),
    "missing content": (
        make_bundle([*VALID_FILES, without(file_entry("/etc/motd"), "content")]),
        "missing field 'content'",
    ),
    "missing uid": (
        make_bundle([*VALID_FILES, without(link_entry("/etc/l", "/x"), "uid")]),
        "missing field 'uid'",
    ),
    "missing target": (
        make_bundle([*VALID_FILES, without(link_entry("/etc/l", "/x"), "target")]),
        "missing field 'target'",
    ),
    "bad base64": (
        make_bundle([*VALID_FILES, file_entry("/etc/b", "!!!", encoding="base64")]),
        "not valid base64",
    ),
    "unknown type": (
        make_bundle([*VALID_FILES, {**file_entry("/etc/f"), "type": "fifo"}]),
        "unknown type 'fifo'",
    ),
    "file before its dir": (
        make_bundle([file_entry("/srv/d/f"), dir_entry("/srv/d")]),
        "listed before its directory /srv/d",
    ),
    "duplicate": (
        make_bundle([*VALID_FILES, file_entry("/etc/qlustar/options.d/node")]),
        "duplicate path",
    ),
    "bad action": (
        make_bundle(
            VALID_FILES,
            [
                {
                    "kind": "ipmi",
                    "address": "10.1.0.300",
                    "netmask": "x",
                    "gateway": "10.1.0.1",
                    "channel": 1,
                }
            ],
        ),
        "actions[0] (ipmi): address",
    ),
    "ipmi gateway not an address": (
        make_bundle(VALID_FILES, [{**IPMI, "gateway": "none"}]),
        "actions[0] (ipmi): gateway",
    ),
    "ipmi gateway missing": (
        make_bundle(VALID_FILES, [without(IPMI, "gateway")]),
        "actions[0] (ipmi): missing field 'gateway'",
    ),
    "if_exists relative": (
        make_bundle(
            VALID_FILES, [{"kind": "command", "argv": ["postconf"], "if_exists": "postconf"}]
        ),
        "actions[0] (command) if_exists: path 'postconf' is not absolute",
    ),
    "if_exists not a string": (
        make_bundle(VALID_FILES, [{"kind": "command", "argv": ["x"], "if_exists": True}]),
        "actions[0] (command): field 'if_exists' must be of type str",
    ),
    "ensure-line relative path": (
        make_bundle(VALID_FILES, [{**ENSURE_LINE, "path": "etc/pam.d/sshd"}]),
        "actions[0] (ensure-line): path 'etc/pam.d/sshd' is not absolute",
    ),
    "ensure-line dotdot": (
        make_bundle(VALID_FILES, [{**ENSURE_LINE, "path": "/etc/pam.d/../shadow"}]),
        "actions[0] (ensure-line): path '/etc/pam.d/../shadow' contains '..'",
    ),
    "ensure-line two lines": (
        make_bundle(VALID_FILES, [{**ENSURE_LINE, "line": "account x\nauth y"}]),
        "actions[0] (ensure-line): line 'account x\\nauth y' is not a single non-empty line",
    ),
    "ensure-line trailing newline": (
        make_bundle(VALID_FILES, [{**ENSURE_LINE, "line": PAM_LINE + "\n"}]),
        "is not a single non-empty line",
    ),
    "ensure-line empty": (
        make_bundle(VALID_FILES, [{**ENSURE_LINE, "line": ""}]),
        "is not a single non-empty line",
    ),
    "ensure-line missing line": (
        make_bundle(VALID_FILES, [without(ENSURE_LINE, "line")]),
        "actions[0] (ensure-line): missing field 'line'",
    ),
    "unknown action": (make_bundle(VALID_FILES, [{"kind": "reboot"}]), "unknown action kind"),
    "not json": (b'{"format": 1, "files": [', "bundle is not valid JSON"),
    # Hostile bundles (issue 8, class 12): refused cleanly, never an internal error.
    "nested very deeply": (
        b'{"format": 1, "node": "x", "files": [], "deep": ' + b"[" * 100000 + b"]" * 100000 + b"}",
        "bundle is not valid JSON: nested too deeply",
    ),
    "huge integer": (
        b'{"format": 1, "node": "x", "files": [], "n": ' + b"9" * 5000 + b"}",
        "bundle is not valid JSON",
    ),
    "huge uid": (
        make_bundle([file_entry("/etc/x", uid=10**40)]),
        "files[0] (/etc/x): uid 10000000000000000000000000000000000000000 is out of range",
    ),
    "float uid": (make_bundle([{**file_entry("/etc/x"), "uid": 1e300}]), "must be of type int"),
    "NaN": (b'{"format": 1, "node": "x", "files": [], "n": NaN}', "NaN is not a JSON number"),
    "Infinity": (
        b'{"format": 1, "node": "x", "files": [], "n": -Infinity}',
        "-Infinity is not a JSON number",
    ),
    "duplicate key": (
        b'{"format": 1, "node": "x", "files": [], "files": []}',
        "duplicate key 'files'",
    ),
    "duplicate key at depth": (
        json.dumps(make_bundle([file_entry("/etc/x")]))
        .replace('"mode": "0644"', '"mode": "0644", "mode": "4755"')
        .encode(),
        "duplicate key 'mode'",
    ),
    "object as content at depth": (
        make_bundle([{**file_entry("/etc/x"), "content": {"a": [1]}}]),
        "files[0] (/etc/x): field 'content' must be of type str",
    ),
    "list as argv word at depth": (
        make_bundle(VALID_FILES, [{"kind": "command", "argv": ["/bin/true", ["x"]]}]),
        "argv must be a non-empty list of strings",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_BUNDLES))
def test_bad_bundle_writes_nothing(
    case: str,
    nodefs: FakeFilesystem,
    head: Head,
    commands: Commands,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle, message = BAD_BUNDLES[case]
    executable(nodefs, "/lib/qlustar/init.d/10-x")
    head.publish(bundle)
    before = snapshot()

    assert run_node(head, commands) == EXIT_UNCONFIGURED

    assert snapshot() == before
    assert commands.calls == []  # no actions, no init.d scripts
    errors = [line for line in console_lines(capsys) if line.startswith("qlustar: ERROR: ")]
    assert len(errors) == 1
    assert message in errors[0]
    assert errors[0].endswith("nothing written, node stays unconfigured")
    assert message in runner_log()


def test_bad_checksum_writes_nothing(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    head.publish(make_bundle(VALID_FILES), checksum="0" * 64)
    before = snapshot()

    assert run_node(head, commands) == EXIT_UNCONFIGURED

    assert snapshot() == before
    out = capsys.readouterr().out
    assert "qlustar: ERROR: cannot fetch bundle" in out
    assert "checksum mismatch" in out
    # A mismatch is retried: the head may have been rewriting the bundle.
    assert len(head.requests) == 2 * (len(node_paths.RETRY_DELAYS) + 1)


def test_conflict_with_node_writes_nothing(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    nodefs.create_dir("/etc/motd.d")
    head.publish(make_bundle([*VALID_FILES, file_entry("/etc/motd.d")]))
    before = snapshot()

    assert run_node(head, commands) == EXIT_UNCONFIGURED

    assert snapshot() == before
    assert "files[3] (/etc/motd.d): is a directory on the node" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# Fetching


def test_fetch_failure_exits_unconfigured(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot()

    assert run_node(head, commands) == EXIT_UNCONFIGURED

    assert snapshot() == before
    assert head.requests == [BUNDLE_URL] * (len(node_paths.RETRY_DELAYS) + 1)
    out = capsys.readouterr().out
    assert (
        f"qlustar: ERROR: cannot fetch bundle {BUNDLE_URL}: Connection refused; "
        "nothing written, node stays unconfigured"
    ) in out
    assert "fetch attempt 1 failed (Connection refused); retrying in 0s" in runner_log()


def test_http_404_is_not_retried(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    not_found = urllib.error.HTTPError(BUNDLE_URL, 404, "Not Found", Message(), None)
    head.failures.append(not_found)

    assert run_node(head, commands) == EXIT_UNCONFIGURED

    assert head.requests == [BUNDLE_URL]
    assert "HTTP 404 Not Found" in capsys.readouterr().out


def test_transient_fetch_failure_is_retried(
    nodefs: FakeFilesystem, head: Head, commands: Commands
) -> None:
    head.publish(make_bundle(VALID_FILES))
    head.failures += [TimeoutError("timed out"), urllib.error.URLError("Network unreachable")]

    assert run_node(head, commands) == EXIT_OK

    assert node_read("/root/.ssh/authorized_keys") == b"key\n"


def test_missing_head_url_exits_unconfigured(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    nodefs.remove("/proc/cmdline")
    nodefs.create_file("/proc/cmdline", contents="quiet BOOTIF=01-52-54-00-12-34-56\n")

    assert run_node(head, commands) == EXIT_UNCONFIGURED

    assert head.requests == []
    out = capsys.readouterr().out
    assert "qlustar: runner started (node MAC 52:54:00:12:34:56, head unknown)" in out
    assert "qlustar: ERROR: no qlustar.http=<URL> on the kernel command line" in out


def test_mac_falls_back_to_boot_nic(nodefs: FakeFilesystem, head: Head, commands: Commands) -> None:
    nodefs.remove("/proc/cmdline")
    nodefs.create_file("/proc/cmdline", contents=f"qlustar.http={BASE}/\n")
    nodefs.create_file("/sys/class/net/eth0/address", contents="52:54:00:12:34:56\n")
    head.publish(make_bundle())

    assert run_node(head, commands) == EXIT_OK

    assert head.requests[0] == BUNDLE_URL


# --------------------------------------------------------------------------------------
# Actions


def test_actions(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    executable(nodefs, "/usr/bin/ipmitool")
    executable(nodefs, "/bin/hostname")
    head.publish(
        make_bundle(
            actions=[
                IPMI,
                {"kind": "hostname", "name": "beo-01"},
                {"kind": "command", "argv": ["/usr/bin/true", "x y"], "description": "noop"},
            ]
        )
    )

    assert run_node(head, commands) == EXIT_OK

    assert commands.calls == [
        ["ipmitool", "lan", "set", "1", "ipsrc", "static"],
        ["ipmitool", "lan", "set", "1", "ipaddr", "10.1.0.5"],
        ["ipmitool", "lan", "set", "1", "netmask", "255.255.0.0"],
        ["ipmitool", "lan", "set", "1", "defgw", "ipaddr", "10.1.0.1"],
        ["hostname", "beo-01"],
        ["/usr/bin/true", "x y"],
    ]
    assert node_read("/etc/hostname") == b"beo-01\n"
    assert node_mode("/etc/hostname") == "0644"
    out = console_lines(capsys)
    assert "qlustar: action ipmi 10.1.0.5 (channel 1) done" in out
    assert "qlustar: action hostname beo-01 done" in out
    assert "qlustar: action command noop done" in out
    assert out[-1] == (
        "qlustar: runner done: 0 files, 3 actions (0 failed), "
        "0 disks (0 failed), 0 scripts (0 failed)"
    )
    # Command output goes to runner.log.
    assert "[ipmitool] output of ipmitool" in runner_log()
    assert "[true] second line of true" in runner_log()


def test_failing_action_is_logged_and_the_rest_runs(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    executable(nodefs, "/usr/bin/ipmitool")
    commands.status = {"ipmitool": 1, "false": 3}
    head.publish(
        make_bundle(
            actions=[
                {"kind": "command", "argv": ["/usr/bin/false"]},
                IPMI,
                {"kind": "command", "argv": ["/usr/bin/true"]},
            ]
        )
    )

    assert run_node(head, commands) == EXIT_OK

    # The IPMI action stops at its first failing ipmitool call.
    assert commands.calls == [
        ["/usr/bin/false"],
        ["ipmitool", "lan", "set", "1", "ipsrc", "static"],
        ["/usr/bin/true"],
    ]
    out = console_lines(capsys)
    assert "qlustar: action command /usr/bin/false FAILED" in out
    assert "qlustar: action ipmi 10.1.0.5 (channel 1) FAILED" in out
    assert "qlustar: action command /usr/bin/true done" in out
    assert out[-1] == (
        "qlustar: runner done: 0 files, 3 actions (2 failed), "
        "0 disks (0 failed), 0 scripts (0 failed)"
    )
    log = runner_log()
    assert "/usr/bin/false exited with status 3" in log
    assert "ipmitool lan set 1 ipsrc static exited with status 1" in log


def test_missing_ipmitool_warns_and_goes_on(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    head.publish(make_bundle(actions=[IPMI, {"kind": "hostname", "name": "beo-01.cluster"}]))

    assert run_node(head, commands) == EXIT_OK

    # No hostname program on this node either: /etc/hostname is still written.
    assert commands.calls == []
    assert node_read("/etc/hostname") == b"beo-01.cluster\n"
    out = console_lines(capsys)
    assert "qlustar: WARNING: ipmitool not found: IPMI address 10.1.0.5 not configured" in out
    assert "qlustar: action ipmi 10.1.0.5 (channel 1) skipped" in out
    assert "qlustar: action hostname beo-01.cluster done" in out
    assert "WARNING: ipmitool not found" in runner_log()


def test_ipmi_without_gateway_leaves_the_gateway_alone(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    executable(nodefs, "/usr/bin/ipmitool")
    head.publish(make_bundle(actions=[{**IPMI, "gateway": "", "channel": 2}]))

    assert run_node(head, commands) == EXIT_OK

    assert commands.calls == [
        ["ipmitool", "lan", "set", "2", "ipsrc", "static"],
        ["ipmitool", "lan", "set", "2", "ipaddr", "10.1.0.5"],
        ["ipmitool", "lan", "set", "2", "netmask", "255.255.0.0"],
    ]
    out = console_lines(capsys)
    assert "qlustar: action ipmi 10.1.0.5 (channel 2) done" in out
    assert out[-1] == (
        "qlustar: runner done: 0 files, 1 actions (0 failed), "
        "0 disks (0 failed), 0 scripts (0 failed)"
    )
    assert "no IPMI gateway: default gateway of channel 2 unchanged" in runner_log()


def test_command_if_exists_skips_when_the_path_is_missing(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    executable(nodefs, "/usr/bin/present")
    head.publish(
        make_bundle(
            actions=[
                {
                    "kind": "command",
                    "argv": ["/usr/sbin/postconf", "-e", "relayhost=[head]"],
                    "description": "postfix relay host [head]",
                    "if_exists": "/usr/sbin/postconf",
                },
                {"kind": "command", "argv": ["/usr/bin/present"], "if_exists": "/usr/bin/present"},
                {"kind": "command", "argv": ["/usr/bin/true"], "if_exists": "/usr/bin"},
            ]
        )
    )

    assert run_node(head, commands) == EXIT_OK

    assert commands.calls == [["/usr/bin/present"], ["/usr/bin/true"]]
    out = console_lines(capsys)
    assert (
        "qlustar: /usr/sbin/postconf not on this node: "
        "/usr/sbin/postconf -e 'relayhost=[head]' not run"
    ) in out
    assert "qlustar: action command postfix relay host [head] skipped" in out
    assert "qlustar: action command /usr/bin/present done" in out
    assert "qlustar: action command /usr/bin/true done" in out
    assert not any("WARNING" in line for line in out)
    assert out[-1] == (
        "qlustar: runner done: 0 files, 3 actions (0 failed), "
        "0 disks (0 failed), 0 scripts (0 failed)"
    )
    assert "/usr/sbin/postconf not on this node" in runner_log()


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (PAM_SSHD, PAM_SSHD + PAM_LINE + "\n"),
        # No final newline: one is added before the line.
        (PAM_SSHD.rstrip("\n"), PAM_SSHD + PAM_LINE + "\n"),
        ("", PAM_LINE + "\n"),
        # Only exactly the line counts as present.
        (
            f"#{PAM_LINE}\n{PAM_LINE} debug\n {PAM_LINE}\naccount required pam_slurm_adopt.so\n",
            f"#{PAM_LINE}\n{PAM_LINE} debug\n {PAM_LINE}\naccount required pam_slurm_adopt.so\n"
            f"{PAM_LINE}\n",
        ),
    ],
    ids=["appended", "no-final-newline", "empty", "similar-lines"],
)
def test_ensure_line_appends_atomically(
    before: str,
    after: str,
    nodefs: FakeFilesystem,
    head: Head,
    commands: Commands,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    nodefs.create_file("/etc/pam.d/sshd", st_mode=stat.S_IFREG | 0o640, contents=before)
    with as_root():
        os.chown("/etc/pam.d/sshd", 0, 42)
    head.publish(make_bundle(actions=[ENSURE_LINE]))
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = node_apply.os.fsync, node_apply.os.replace

    def spy_fsync(fd: int) -> None:
        events.append(("fsync",))
        real_fsync(fd)

    def spy_replace(src: str, dst: str) -> None:
        # The complete new file, with the old one's mode and owner, beside the old one.
        assert os.path.dirname(src) == os.path.dirname(dst) == "/etc/pam.d"
        assert Path(dst).read_text() == before
        assert Path(src).read_text() == after
        st = os.stat(src)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, 42)
        events.append(("replace", dst))
        real_replace(src, dst)

    monkeypatch.setattr(node_apply.os, "fsync", spy_fsync)
    monkeypatch.setattr(node_apply.os, "replace", spy_replace)

    with as_root():  # as on the node: only root may read this file
        assert run_node(head, commands) == EXIT_OK

    assert events == [("fsync",), ("replace", "/etc/pam.d/sshd")]
    assert node_read("/etc/pam.d/sshd") == after.encode()
    assert node_mode("/etc/pam.d/sshd") == "0640"
    assert node_owner("/etc/pam.d/sshd") == (0, 42)
    assert os.listdir("/etc/pam.d") == ["sshd"]  # no temporary file left
    out = console_lines(capsys)
    assert "qlustar: action ensure-line /etc/pam.d/sshd done" in out
    assert out[-1] == (
        "qlustar: runner done: 0 files, 1 actions (0 failed), "
        "0 disks (0 failed), 0 scripts (0 failed)"
    )
    assert f"added the line {PAM_LINE!r} to /etc/pam.d/sshd" in runner_log()


@pytest.mark.parametrize("content", [f"{PAM_SSHD}{PAM_LINE}\n", f"{PAM_LINE}\n{PAM_SSHD}"[:-1]])
def test_ensure_line_leaves_a_file_with_the_line_alone(
    content: str,
    nodefs: FakeFilesystem,
    head: Head,
    commands: Commands,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    nodefs.create_file("/etc/pam.d/sshd", contents=content)
    head.publish(make_bundle(actions=[ENSURE_LINE]))
    replaced: list[str] = []
    monkeypatch.setattr(node_apply.os, "replace", lambda src, dst: replaced.append(dst))

    assert run_node(head, commands) == EXIT_OK

    assert replaced == []
    assert node_read("/etc/pam.d/sshd") == content.encode()
    assert "qlustar: action ensure-line /etc/pam.d/sshd done" in console_lines(capsys)
    assert f"/etc/pam.d/sshd already has the line {PAM_LINE!r}" in runner_log()


def test_ensure_line_on_a_missing_file_warns_and_skips(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    nodefs.create_dir("/etc/pam.d")
    nodefs.create_symlink("/etc/pam.d/login", "/etc/pam.d/missing")  # dangling
    head.publish(
        make_bundle(
            actions=[
                ENSURE_LINE,
                {**ENSURE_LINE, "path": "/etc/pam.d/login"},
                {**ENSURE_LINE, "path": "/etc/nothere/sshd"},
                {"kind": "command", "argv": ["/usr/bin/true"]},
            ]
        )
    )

    assert run_node(head, commands) == EXIT_OK

    with as_root():
        assert os.listdir("/etc/pam.d") == ["login"]
        assert not os.path.lexists("/etc/nothere")
    assert commands.calls == [["/usr/bin/true"]]
    out = console_lines(capsys)
    for path in ("/etc/pam.d/sshd", "/etc/pam.d/login", "/etc/nothere/sshd"):
        assert f"qlustar: WARNING: {path} does not exist: line {PAM_LINE!r} not added" in out
        assert f"qlustar: action ensure-line {path} skipped" in out
    assert out[-1] == (
        "qlustar: runner done: 0 files, 4 actions (0 failed), "
        "0 disks (0 failed), 0 scripts (0 failed)"
    )
    assert "WARNING: /etc/pam.d/sshd does not exist" in runner_log()


def test_ensure_line_follows_a_symlink(
    nodefs: FakeFilesystem, head: Head, commands: Commands
) -> None:
    nodefs.create_file("/usr/share/pam/sshd", st_mode=stat.S_IFREG | 0o600, contents=PAM_SSHD)
    nodefs.create_symlink("/etc/pam.d/sshd", "../../usr/share/pam/sshd")
    head.publish(make_bundle(actions=[ENSURE_LINE]))

    assert run_node(head, commands) == EXIT_OK

    with as_root():
        assert os.readlink("/etc/pam.d/sshd") == "../../usr/share/pam/sshd"
    assert node_read("/usr/share/pam/sshd") == f"{PAM_SSHD}{PAM_LINE}\n".encode()
    assert node_mode("/usr/share/pam/sshd") == "0600"


def test_ensure_line_on_a_directory_fails(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    nodefs.create_dir("/etc/pam.d/sshd")
    head.publish(make_bundle(actions=[ENSURE_LINE]))

    assert run_node(head, commands) == EXIT_OK

    out = console_lines(capsys)
    assert "qlustar: action ensure-line /etc/pam.d/sshd FAILED" in out
    assert out[-1] == (
        "qlustar: runner done: 0 files, 1 actions (1 failed), "
        "0 disks (0 failed), 0 scripts (0 failed)"
    )
    assert "/etc/pam.d/sshd is not a regular file" in runner_log()


# --------------------------------------------------------------------------------------
# Bundles from the real renderer (qlimage.bundle)

# beo-08: IPMI on a network without gateway, pam_slurm and mail; beo-01 (see test_bundle.py)
# has them too (with a gateway) plus rootfs files, directories, symlinks and an init.d script.
RENDERED_HOSTS = """
[[hosts]]
name = "beo-08"
mac = "52:54:00:12:34:5d"
image = "demo"
networks.boot = "10.0.2.22"
networks.ib = "10.10.3.4"
[hosts.options]
ipmi = { network = "ib" }
pam_slurm = true
mail = { relayhost = "[head]" }
"""


@pytest.mark.parametrize("node", ["beo-01", "beo-08"])
def test_bundle_from_the_renderer_is_applied(
    node: str,
    tmp_path: Path,
    head: Head,
    commands: Commands,
    capsys: pytest.CaptureFixture[str],
) -> None:
    site = load_site(make_site(tmp_path / "site", extra_hosts=RENDERED_HOSTS))
    rendered = qb.render_bundle(site, site.host(node))
    data = qb.bundle_json(rendered)
    kinds = [a["kind"] for a in rendered.actions]
    assert kinds == ["hostname", "ipmi", "command", "ensure-line"]
    ipmi = rendered.actions[1]
    assert (ipmi["gateway"] == "") == (node == "beo-08")

    parsed = node_bundle.parse_bundle(data, "0" * 64)
    assert [type(a).__name__ for a in parsed.actions] == [
        "HostnameAction", "IpmiAction", "CommandAction", "EnsureLineAction"
    ]  # fmt: skip
    assert parsed.actions[1] == node_bundle.IpmiAction(
        ipmi["address"], ipmi["netmask"], ipmi["gateway"], ipmi["channel"]
    )
    assert parsed.actions[2] == node_bundle.CommandAction(
        tuple(rendered.actions[2]["argv"]),
        rendered.actions[2]["description"],
        "/usr/sbin/postconf",
    )
    assert parsed.actions[3] == node_bundle.EnsureLineAction("/etc/pam.d/sshd", PAM_LINE)

    with fake_node() as fs:
        executable(fs, "/usr/bin/ipmitool")
        executable(fs, "/bin/hostname")
        if node == "beo-01":  # beo-08's image has no postfix
            executable(fs, "/usr/sbin/postconf")
        fs.create_file("/etc/pam.d/sshd", contents=PAM_SSHD)
        head.publish(data)

        # As root, as on the node: beo-01's bundle makes /etc root's (0755) before the
        # actions write /etc/hostname.
        with as_root():
            assert run_node(head, commands) == EXIT_OK

        assert node_read("/etc/pam.d/sshd") == f"{PAM_SSHD}{PAM_LINE}\n".encode()
        for f in rendered.files:
            if f.type == "symlink":
                with as_root():
                    assert os.readlink(f.path) == f.target
            else:
                assert node_mode(f.path) == f"{f.mode:04o}", f.path
                if f.type == "file":
                    assert node_read(f.path) == f.content, f.path
            assert node_owner(f.path) == (f.uid, f.gid), f.path
        assert node_read("/etc/hostname") == f"{node}\n".encode()

    lan = ["ipmitool", "lan", "set", "1"]
    expected = [
        ["hostname", node],
        [*lan, "ipsrc", "static"],
        [*lan, "ipaddr", ipmi["address"]],
        [*lan, "netmask", ipmi["netmask"]],
    ]
    if node == "beo-01":
        expected += [
            [*lan, "defgw", "ipaddr", "10.1.0.1"],
            ["/usr/sbin/postconf", "-e", "relayhost=[smtp2.example.org]:587"],
            ["/lib/qlustar/init.d/50-nvidia"],
        ]
    assert commands.calls == expected
    out = console_lines(capsys)
    assert "qlustar: action ensure-line /etc/pam.d/sshd done" in out
    mail = "done" if node == "beo-01" else "skipped"
    assert f"qlustar: action command {rendered.actions[2]['description']} {mail}" in out
    # beo-01 has a disk-config for /dev/sda, which this node lacks: skipped with a warning.
    n_files, n_scripts = len(rendered.files), int(node == "beo-01")
    n_disks = int(node == "beo-01")
    if node == "beo-01":
        assert "qlustar: WARNING: disk /dev/sda not found on this node: disk setup skipped" in out
        assert "qlustar: disk setup skipped" in out
    assert out[-1] == (
        f"qlustar: runner done: {n_files} files, 4 actions (0 failed), "
        f"{n_disks} disks (0 failed), {n_scripts} scripts (0 failed)"
    )


# --------------------------------------------------------------------------------------
# init.d scripts


def test_init_d_scripts_run_in_byte_order(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("10-b", "02-a", "99-z", "a", "B"):
        executable(nodefs, f"/lib/qlustar/init.d/{name}")
    executable(nodefs, "/lib/qlustar/init.d/50-readme", mode=0o644)
    executable(nodefs, "/lib/qlustar/init.d/.10-b.swp")
    nodefs.create_dir("/lib/qlustar/init.d/60-dir")
    commands.status = {"10-b": 2}
    head.publish(make_bundle())

    assert run_node(head, commands) == EXIT_OK

    assert commands.calls == [
        [f"/lib/qlustar/init.d/{n}"] for n in ("02-a", "10-b", "99-z", "B", "a")
    ]
    out = console_lines(capsys)
    script_lines = [line for line in out if "init.d" in line]
    assert script_lines == [
        "qlustar: init.d 02-a started",
        "qlustar: init.d 02-a exited with status 0",
        "qlustar: init.d 10-b started",
        "qlustar: init.d 10-b exited with status 2",
        "qlustar: init.d 99-z started",
        "qlustar: init.d 99-z exited with status 0",
        "qlustar: init.d B started",
        "qlustar: init.d B exited with status 0",
        "qlustar: init.d a started",
        "qlustar: init.d a exited with status 0",
    ]
    assert out[-1] == (
        "qlustar: runner done: 0 files, 0 actions (0 failed), "
        "0 disks (0 failed), 5 scripts (1 failed)"
    )
    assert node_read("/var/log/qlustar/init.d/10-b.log") == (
        b"output of 10-b\nsecond line of 10-b\n"
    )
    assert node_mode("/var/log/qlustar/init.d") == "0755"
    log = runner_log()
    assert "[99-z] second line of 99-z" in log
    assert "init.d 10-b exited with status 2" in log
    assert "init.d 50-readme skipped: not executable" in log
    assert "init.d 60-dir skipped: not a regular file" in log
    assert "init.d .10-b.swp skipped: hidden file" in log


def test_init_d_scripts_from_the_bundle_run(
    nodefs: FakeFilesystem, head: Head, commands: Commands
) -> None:
    head.publish(
        make_bundle([file_entry("/lib/qlustar/init.d/20-disk", "#!/bin/sh\n", mode="0700")])
    )

    assert run_node(head, commands) == EXIT_OK

    assert commands.calls == [["/lib/qlustar/init.d/20-disk"]]
    assert node_owner("/lib/qlustar/init.d/20-disk") == (0, 0)


# --------------------------------------------------------------------------------------
# Local disk (/etc/qlustar/options.d/disk-config)

DISK_CONFIG = "/etc/qlustar/options.d/disk-config"
DISK_TOOLS = ("sfdisk", "blkid", "partx", "mkfs.ext4", "mkfs.xfs", "mkswap", "mount", "swapon")
FSTAB = "# /etc/fstab: static file system information.\nproc /proc proc defaults 0 0\n"
# A 512MiB swap partition, 10GiB ext4 on /scratch (labelled, with options), the rest xfs.
SDB_PARTS = """\
part 1 512MiB swap - swap0 -
part 2 10GiB ext4 /scratch scratch noatime,nodev
part 3 rest xfs /data - -
"""
SDB_SCRIPT = "size=512MiB, type=swap\nsize=10240MiB, type=linux\ntype=linux\n"
SDB_FSTAB = (
    "/dev/sdb1 none swap sw 0 0 # qlustar-disk\n"
    "/dev/sdb2 /scratch ext4 noatime,nodev 0 0 # qlustar-disk\n"
    "/dev/sdb3 /data xfs defaults 0 0 # qlustar-disk\n"
)
BLANK = {"sfdisk --dump /dev/sdb": 1, "blkid -p /dev/sdb": 2}  # no table, no signature
INIT_D_10X = "/lib/qlustar/init.d/10-x"


def disk_config(
    device: str = "/dev/sdb",
    label: str = "gpt",
    wipe: str = "if-unformatted",
    parts: str = SDB_PARTS,
) -> str:
    """As the head writes it (comments and an empty line included)."""
    return f"# disk-config of beo-01\n\ndevice={device}\nlabel={label}\nwipe={wipe}\n{parts}"


def block_device(fs: FakeFilesystem, path: str) -> None:
    fs.create_file(path, st_mode=stat.S_IFBLK | 0o660)


def disk_node(
    fs: FakeFilesystem,
    commands: Commands,
    *,
    disk: str = "/dev/sdb",
    partitions: int = 0,
    appear: int = 3,
    tools: Sequence[str] = DISK_TOOLS,
) -> None:
    """A node with the tools in /usr/sbin, the disk with `partitions` existing partition
    device nodes, an /etc/fstab and an init.d script. Like the kernel, writing a partition
    table with sfdisk makes `appear` partition device nodes appear."""
    for tool in tools:
        executable(fs, f"/usr/sbin/{tool}")
    executable(fs, INIT_D_10X)
    block_device(fs, disk)
    for n in range(1, partitions + 1):
        block_device(fs, node_disk.partition_device(disk, n))
    fs.create_file("/etc/fstab", contents=FSTAB)
    os.chmod("/etc/fstab", 0o644)

    def sfdisk(argv: list[str]) -> None:
        if "--dump" in argv:
            return
        for n in range(1, appear + 1):
            path = node_disk.partition_device(os.path.realpath(argv[-1]), n)
            if not os.path.exists(path):
                block_device(fs, path)

    commands.effects["sfdisk"] = sfdisk


def boot_with_disk(
    head: Head, commands: Commands, config: str, actions: Sequence[dict[str, Any]] = ()
) -> int:
    """Boot with a bundle holding `config` as the disk-config, as root (as on the node)."""
    head.publish(make_bundle([file_entry(DISK_CONFIG, config)], actions))
    with as_root():
        return run_node(head, commands)


def partition_commands(disk: str = "/dev/sdb", p: str = "") -> list[list[str]]:
    """Partitioning and formatting SDB_PARTS on `disk` (partition names `disk`+`p`+n)."""
    return [
        ["sfdisk", "--wipe", "always", "--wipe-partitions", "always", disk],
        ["partx", "-u", disk],
        ["mkswap", "-L", "swap0", f"{disk}{p}1"],
        ["mkfs.ext4", "-F", "-q", "-L", "scratch", f"{disk}{p}2"],
        ["mkfs.xfs", "-f", f"{disk}{p}3"],
    ]


def mount_commands(disk: str = "/dev/sdb", p: str = "") -> list[list[str]]:
    return [
        ["swapon", f"{disk}{p}1"],
        ["mount", "-t", "ext4", "-o", "noatime,nodev", f"{disk}{p}2", "/scratch"],
        ["mount", "-t", "xfs", f"{disk}{p}3", "/data"],
    ]


def summary(actions: str = "0 actions (0 failed)", disks: str = "1 disks (0 failed)") -> str:
    return f"qlustar: runner done: 1 files, {actions}, {disks}, 1 scripts (0 failed)"


@pytest.mark.parametrize("label", ["gpt", "dos"])
def test_disk_is_partitioned_formatted_and_mounted_between_actions_and_init_d(
    label: str,
    nodefs: FakeFilesystem,
    head: Head,
    commands: Commands,
    capsys: pytest.CaptureFixture[str],
) -> None:
    disk_node(nodefs, commands)
    commands.argv_status = dict(BLANK)
    action = {"kind": "command", "argv": ["/usr/bin/true"]}

    assert boot_with_disk(head, commands, disk_config(label=label), [action]) == EXIT_OK

    # After the actions, before the init.d scripts.
    assert commands.calls == [
        ["/usr/bin/true"],
        ["sfdisk", "--dump", "/dev/sdb"],
        ["blkid", "-p", "/dev/sdb"],
        *partition_commands(),
        *mount_commands(),
        [INIT_D_10X],
    ]
    sfdisk_input = commands.inputs[commands.calls.index(partition_commands()[0])]
    assert sfdisk_input == f"label: {label}\n{SDB_SCRIPT}"
    assert [i for i in commands.inputs if i is not None] == [sfdisk_input]
    assert node_read("/etc/fstab").decode() == FSTAB + SDB_FSTAB
    assert node_mode("/etc/fstab") == "0644"
    for mount_point in ("/scratch", "/data"):
        assert node_mode(mount_point) == "0755"
    out = console_lines(capsys)
    disk_lines = [line for line in out if line.startswith("qlustar: disk")]
    assert disk_lines == [
        f"qlustar: disk /dev/sdb: partitioned ({label}, 3 partitions)",
        "qlustar: disk /dev/sdb: made swap on /dev/sdb1, label swap0",
        "qlustar: disk /dev/sdb: made ext4 on /dev/sdb2, label scratch",
        "qlustar: disk /dev/sdb: made xfs on /dev/sdb3",
        "qlustar: disk /dev/sdb: swap on /dev/sdb1",
        "qlustar: disk /dev/sdb: mounted /dev/sdb2 on /scratch",
        "qlustar: disk /dev/sdb: mounted /dev/sdb3 on /data",
        "qlustar: disk setup done",
    ]
    assert out.index("qlustar: action command /usr/bin/true done") < out.index(disk_lines[0])
    assert out.index("qlustar: disk setup done") < out.index("qlustar: init.d 10-x started")
    assert out[-1] == summary(actions="1 actions (0 failed)")
    # Command output and sfdisk's input are in the log, not on the console.
    log = runner_log()
    assert "[sfdisk stdin] size=10240MiB, type=linux" in log
    assert "[mkfs.xfs] second line of mkfs.xfs" in log
    assert not any("mkfs.xfs]" in line for line in out)


@pytest.mark.parametrize(
    ("disk", "p"),
    [("/dev/sdb", ""), ("/dev/vda", ""), ("/dev/nvme0n1", "p"), ("/dev/loop0", "p"),
     ("/dev/mmcblk0", "p")],
)  # fmt: skip
def test_partition_device_names(
    disk: str, p: str, nodefs: FakeFilesystem, head: Head, commands: Commands
) -> None:
    disk_node(nodefs, commands, disk=disk)

    assert boot_with_disk(head, commands, disk_config(device=disk, wipe="always")) == EXIT_OK

    expected = [*partition_commands(disk, p), *mount_commands(disk, p), [INIT_D_10X]]
    assert commands.calls == expected
    assert node_disk.partition_device(disk, 12) == f"{disk}{p}12"


def test_disk_by_id_link_is_resolved_for_partition_names(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    disk_node(nodefs, commands, disk="/dev/nvme0n1")
    nodefs.create_symlink("/dev/disk/by-id/nvme-Samsung_SSD_1", "../../nvme0n1")
    config = disk_config(device="/dev/disk/by-id/nvme-Samsung_SSD_1", wipe="always")

    assert boot_with_disk(head, commands, config) == EXIT_OK

    disk = "/dev/nvme0n1"
    expected = [*partition_commands(disk, "p"), *mount_commands(disk, "p"), [INIT_D_10X]]
    assert commands.calls == expected
    out = console_lines(capsys)
    assert (
        "qlustar: disk /dev/disk/by-id/nvme-Samsung_SSD_1: partitioned (gpt, 3 partitions)" in out
    )
    assert "disk /dev/disk/by-id/nvme-Samsung_SSD_1 is /dev/nvme0n1" in runner_log()


PROBE = [["sfdisk", "--dump", "/dev/sdb"], ["blkid", "-p", "/dev/sdb"]]


@pytest.mark.parametrize(
    ("wipe", "dump", "blkid", "expected"),
    [
        # never: the table is never touched, nor even looked at; no sfdisk needed.
        ("never", None, None, "kept"),
        # if-unformatted: sfdisk --dump finds a table: kept.
        ("if-unformatted", 0, None, "kept"),
        # ...finds none, and blkid -p no other signature (status 2): partitioned.
        ("if-unformatted", 1, 2, "partitioned"),
        # ...finds none, but blkid -p finds e.g. a file system on the whole disk: refused.
        ("if-unformatted", 1, 0, "signature"),
        # ...and blkid cannot probe it: refused.
        ("if-unformatted", 1, 4, "probe"),
        # always: at every boot, without looking.
        ("always", None, None, "partitioned"),
    ],
)
def test_wipe_policy(
    wipe: str,
    dump: int | None,
    blkid: int | None,
    expected: str,
    nodefs: FakeFilesystem,
    head: Head,
    commands: Commands,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tools = ("mount", "swapon") if wipe == "never" else DISK_TOOLS
    disk_node(nodefs, commands, partitions=3, tools=tools)
    if dump is not None:
        commands.argv_status["sfdisk --dump /dev/sdb"] = dump
    if blkid is not None:
        commands.argv_status["blkid -p /dev/sdb"] = blkid

    assert boot_with_disk(head, commands, disk_config(wipe=wipe)) == EXIT_OK

    probe = PROBE[: (dump is not None) + (blkid is not None)]
    out = console_lines(capsys)
    if expected == "kept":
        assert commands.calls == [*probe, *mount_commands(), [INIT_D_10X]]
        assert f"qlustar: disk /dev/sdb: kept existing partitions (wipe={wipe})" in out
        assert not any("partitioned" in line or "made" in line for line in out)
        assert node_read("/etc/fstab").decode() == FSTAB + SDB_FSTAB
        assert out[-1] == summary()
    elif expected == "partitioned":
        assert commands.calls == [*probe, *partition_commands(), *mount_commands(), [INIT_D_10X]]
        assert "qlustar: disk /dev/sdb: partitioned (gpt, 3 partitions)" in out
        assert out[-1] == summary()
    else:
        reason = {
            "signature": "no partition table, but a signature blkid recognizes (see runner.log); "
            "not partitioned (wipe=always would)",
            "probe": "cannot probe the disk: blkid -p exited with status 4",
        }[expected]
        assert commands.calls == [*probe, [INIT_D_10X]]
        assert f"qlustar: ERROR: disk /dev/sdb: {reason}" in out
        assert "qlustar: disk setup FAILED" in out
        assert node_read("/etc/fstab").decode() == FSTAB
        assert out[-1] == summary(disks="1 disks (1 failed)")


def test_fstab_lines_are_replaced_idempotently_across_boots(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    disk_node(nodefs, commands)
    stale = "/dev/sdz1 /old ext4 defaults 0 0 # qlustar-disk\n"
    nodefs.remove("/etc/fstab")
    nodefs.create_file("/etc/fstab", contents=stale + FSTAB + "tmpfs /tmp tmpfs defaults 0 0")
    os.chmod("/etc/fstab", 0o640)
    commands.argv_status = dict(BLANK)
    config = disk_config()
    kept_lines = FSTAB + "tmpfs /tmp tmpfs defaults 0 0\n"

    # First boot: a blank disk is partitioned; the runner's old line is replaced.
    assert boot_with_disk(head, commands, config) == EXIT_OK
    assert node_read("/etc/fstab").decode() == kept_lines + SDB_FSTAB
    assert node_mode("/etc/fstab") == "0640"
    assert "partitioned (gpt, 3 partitions)" in capsys.readouterr().out

    # Second boot: the disk has its table now, so it is only mounted; same fstab.
    commands.calls.clear()
    commands.argv_status["sfdisk --dump /dev/sdb"] = 0
    assert boot_with_disk(head, commands, config) == EXIT_OK
    assert commands.calls == [PROBE[0], *mount_commands(), [INIT_D_10X]]
    assert node_read("/etc/fstab").decode() == kept_lines + SDB_FSTAB
    assert node_mode("/etc/fstab") == "0640"
    out = console_lines(capsys)
    assert "qlustar: disk /dev/sdb: kept existing partitions (wipe=if-unformatted)" in out
    assert "/etc/fstab unchanged" in runner_log()


def test_fstab_is_created_when_the_image_has_none(
    nodefs: FakeFilesystem, head: Head, commands: Commands
) -> None:
    disk_node(nodefs, commands, partitions=3)
    nodefs.remove("/etc/fstab")

    assert boot_with_disk(head, commands, disk_config(wipe="never")) == EXIT_OK

    assert node_read("/etc/fstab").decode() == SDB_FSTAB
    assert node_mode("/etc/fstab") == "0644"
    assert node_owner("/etc/fstab") == (0, 0)


def test_mounted_partitions_and_active_swap_are_kept(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    disk_node(nodefs, commands, partitions=3)
    # A mount point with a space: \0040 in disk-config, \040 in /proc/self/mounts and fstab.
    parts = SDB_PARTS.replace("/scratch", "/my\\0040scratch")
    nodefs.create_file(
        "/proc/self/mounts",
        contents="proc /proc proc rw 0 0\n/dev/sdb2 /my\\040scratch ext4 rw,noatime 0 0\n",
    )
    nodefs.create_file(
        "/proc/swaps",
        contents="Filename\tType\tSize\tUsed\tPriority\n/dev/sdb1  partition\t524284\t0\t-2\n",
    )

    assert boot_with_disk(head, commands, disk_config(wipe="never", parts=parts)) == EXIT_OK

    assert commands.calls == [["mount", "-t", "xfs", "/dev/sdb3", "/data"], [INIT_D_10X]]
    out = console_lines(capsys)
    assert "qlustar: disk /dev/sdb: swap on /dev/sdb1 already active" in out
    assert "qlustar: disk /dev/sdb: /dev/sdb2 already mounted on /my scratch" in out
    assert node_read("/etc/fstab").decode() == FSTAB + SDB_FSTAB.replace(
        "/scratch", "/my\\040scratch"
    )


def test_no_disk_config_means_no_disk_step(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    disk_node(nodefs, commands)
    head.publish(make_bundle())

    assert run_node(head, commands) == EXIT_OK

    assert commands.calls == [[INIT_D_10X]]
    out = console_lines(capsys)
    assert not any(line.startswith("qlustar: disk") for line in out)
    assert out[-1] == (
        "qlustar: runner done: 0 files, 0 actions (0 failed), 0 disks (0 failed), "
        "1 scripts (0 failed)"
    )
    assert f"no {DISK_CONFIG}: no local disk to set up" in runner_log()
    assert node_read("/etc/fstab").decode() == FSTAB


def test_disk_not_on_this_node_is_skipped_with_a_warning(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    disk_node(nodefs, commands)

    assert boot_with_disk(head, commands, disk_config(device="/dev/sdc", wipe="always")) == EXIT_OK

    assert commands.calls == [[INIT_D_10X]]
    out = console_lines(capsys)
    assert "qlustar: WARNING: disk /dev/sdc not found on this node: disk setup skipped" in out
    assert "qlustar: disk setup skipped" in out
    assert out[-1] == summary()
    assert node_read("/etc/fstab").decode() == FSTAB


def test_disk_that_is_not_a_block_device_fails(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    disk_node(nodefs, commands)
    nodefs.create_file("/dev/sdc", contents="")

    assert boot_with_disk(head, commands, disk_config(device="/dev/sdc", wipe="always")) == EXIT_OK

    assert commands.calls == [[INIT_D_10X]]
    out = console_lines(capsys)
    assert "qlustar: ERROR: disk /dev/sdc: not a block device" in out
    assert out[-1] == summary(disks="1 disks (1 failed)")


BAD_DISK_CONFIGS: dict[str, tuple[str, str]] = {
    "unknown keyword": (disk_config() + "size=10\n", "line 9: unknown keyword 'size'"),
    "misspelt keyword": (
        disk_config().replace("wipe=", "wype="),
        "line 5: unknown keyword 'wype'",
    ),
    "size zero": (
        disk_config(parts="part 1 0MiB ext4 /x - -\n"),
        "line 6: bad size '0MiB' (<N>MiB, <N>GiB, <N>TiB with N > 0, or rest)",
    ),
    "size unit": (disk_config(parts="part 1 10GB ext4 /x - -\n"), "bad size '10GB'"),
    "size words": (disk_config(parts="part 1 ten ext4 /x - -\n"), "bad size 'ten'"),
    "rest not last": (
        disk_config(parts="part 1 rest ext4 /x - -\npart 2 1GiB swap - - -\n"),
        "line 7: partition after the one of size 'rest' (must be last)",
    ),
    "bad fs": (
        disk_config(parts="part 1 rest btrfs /x - -\n"),
        "line 6: bad file system 'btrfs' (one of ext4, xfs, swap)",
    ),
    "bad table label": (
        disk_config(label="mbr"),
        "bad partition table label='mbr' (one of gpt, dos)",
    ),
    "bad wipe": (
        disk_config(wipe="sometimes"),
        "bad wipe='sometimes' (one of never, if-unformatted, always)",
    ),
    "no device": (disk_config().replace("device=/dev/sdb\n", ""), "no device= line"),
    "device twice": (disk_config() + "device=/dev/sdc\n", "line 9: device= given twice"),
    "relative device": (disk_config(device="sdb"), "device 'sdb' is not an absolute path"),
    "bad escape": (
        disk_config(device="/dev/my\\x20disk"),
        "device '/dev/my\\\\x20disk': a backslash must start a \\0ooo escape",
    ),
    "no partitions": (disk_config(parts=""), "no part lines"),
    "field missing": (
        disk_config(parts="part 1 rest ext4 /x -\n"),
        "line 6: a part line has 7 fields, not 6",
    ),
    "keyword with a value": (
        disk_config().replace("wipe=if-unformatted", "wipe=never always"),
        "line 5: wipe= takes one value without spaces",
    ),
    "numbering": (
        disk_config(parts="part 2 rest ext4 /x - -\n"),
        "line 6: partition number '2', expected 1",
    ),
    "relative mount point": (
        disk_config(parts="part 1 rest ext4 scratch - -\n"),
        "mount point 'scratch' is not an absolute normalized path",
    ),
    "mount point with ..": (
        disk_config(parts="part 1 rest ext4 /srv/../etc - -\n"),
        "mount point '/srv/../etc' is not an absolute normalized path",
    ),
    "mount on /": (
        disk_config(parts="part 1 rest ext4 / - -\n"),
        "mount point '/' is the root directory",
    ),
    "swap with a mount point": (
        disk_config(parts="part 1 rest swap /swap - -\n"),
        "a swap partition has no mount point ('/swap')",
    ),
    "xfs label too long": (
        disk_config(parts="part 1 rest xfs /data abcdefghijklm -\n"),
        "label 'abcdefghijklm' is longer than 12 bytes for xfs",
    ),
    "options with a space": (
        disk_config(parts="part 1 rest ext4 /x - noatime,\\0040nodev\n"),
        "mount options 'noatime, nodev' contain white space",
    ),
    "dos with 5 partitions": (
        disk_config(label="dos", parts="".join(f"part {n} 1GiB ext4 - - -\n" for n in range(1, 6))),
        "a dos partition table holds 4 partitions, not 5",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DISK_CONFIGS))
def test_bad_disk_config_fails_the_step_and_the_boot_goes_on(
    case: str,
    nodefs: FakeFilesystem,
    head: Head,
    commands: Commands,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config, message = BAD_DISK_CONFIGS[case]
    disk_node(nodefs, commands, partitions=3)

    assert boot_with_disk(head, commands, config) == EXIT_OK

    assert commands.calls == [[INIT_D_10X]]  # the disk untouched; init.d scripts still run
    out = console_lines(capsys)
    errors = [line for line in out if line.startswith("qlustar: ERROR: ")]
    assert len(errors) == 1
    assert errors[0].startswith(f"qlustar: ERROR: {DISK_CONFIG}: ")
    assert message in errors[0]
    assert "qlustar: disk setup FAILED" in out
    assert out[-1] == summary(disks="1 disks (1 failed)")
    assert node_read("/etc/fstab").decode() == FSTAB


@pytest.mark.parametrize(
    ("missing", "wipe", "package", "probed"),
    [
        ("sfdisk", "if-unformatted", "fdisk", False),
        ("sfdisk", "always", "fdisk", False),
        ("blkid", "if-unformatted", "util-linux", False),
        ("mkfs.xfs", "if-unformatted", "xfsprogs", True),
        ("mkfs.ext4", "always", "e2fsprogs", False),
        ("mkswap", "always", "util-linux", False),
        ("mount", "never", "mount", False),
        ("swapon", "always", "mount", False),
    ],
)
def test_missing_tool_fails_the_step_before_touching_the_disk(
    missing: str,
    wipe: str,
    package: str,
    probed: bool,
    nodefs: FakeFilesystem,
    head: Head,
    commands: Commands,
    capsys: pytest.CaptureFixture[str],
) -> None:
    disk_node(nodefs, commands, partitions=3, tools=[t for t in DISK_TOOLS if t != missing])
    commands.argv_status = dict(BLANK)

    assert boot_with_disk(head, commands, disk_config(wipe=wipe)) == EXIT_OK

    assert commands.calls == [*(PROBE if probed else []), [INIT_D_10X]]
    out = console_lines(capsys)
    assert f"qlustar: ERROR: disk /dev/sdb: {missing} not found (Debian package {package})" in out
    assert "qlustar: disk setup FAILED" in out
    assert out[-1] == summary(disks="1 disks (1 failed)")


def test_partx_and_udevadm_are_optional_and_used_when_present(
    nodefs: FakeFilesystem, head: Head, commands: Commands
) -> None:
    disk_node(nodefs, commands, tools=[t for t in DISK_TOOLS if t != "partx"])
    executable(nodefs, "/bin/udevadm")

    assert boot_with_disk(head, commands, disk_config(wipe="always")) == EXIT_OK

    sfdisk, _partx, *mkfs = partition_commands()
    assert commands.calls == [sfdisk, ["udevadm", "settle"], *mkfs, *mount_commands(), [INIT_D_10X]]


def test_sfdisk_failure_leaves_the_disk_alone(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    disk_node(nodefs, commands, partitions=3, appear=0)
    sfdisk = partition_commands()[0]
    commands.argv_status[" ".join(sfdisk)] = 1  # e.g. a partition is mounted: in use

    assert boot_with_disk(head, commands, disk_config(wipe="always")) == EXIT_OK

    assert commands.calls == [sfdisk, [INIT_D_10X]]
    out = console_lines(capsys)
    assert (
        "qlustar: ERROR: disk /dev/sdb: sfdisk failed (status 1; is the disk in use? "
        "see runner.log)"
    ) in out
    assert out[-1] == summary(disks="1 disks (1 failed)")


def test_mkfs_failure_stops_before_mounting(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    disk_node(nodefs, commands)
    commands.status["mkfs.ext4"] = 1

    assert boot_with_disk(head, commands, disk_config(wipe="always")) == EXIT_OK

    assert commands.calls == [*partition_commands()[:4], [INIT_D_10X]]
    out = console_lines(capsys)
    error = "mkfs.ext4 failed on /dev/sdb2 (status 1; see runner.log)"
    assert f"qlustar: ERROR: disk /dev/sdb: {error}" in out
    assert out[-1] == summary(disks="1 disks (1 failed)")


def test_partitions_that_do_not_appear_fail_the_step(
    nodefs: FakeFilesystem,
    head: Head,
    commands: Commands,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(node_paths, "PARTITION_WAIT", 0.3)
    disk_node(nodefs, commands, appear=2)

    started = time.monotonic()
    assert boot_with_disk(head, commands, disk_config(wipe="always")) == EXIT_OK
    assert 0.3 <= time.monotonic() - started < 3

    assert commands.calls == [*partition_commands()[:2], [INIT_D_10X]]
    out = console_lines(capsys)
    assert "qlustar: ERROR: disk /dev/sdb: partition /dev/sdb3 did not appear within 0.3s" in out


def test_one_failing_mount_does_not_stop_the_others(
    nodefs: FakeFilesystem,
    head: Head,
    commands: Commands,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(node_paths, "PARTITION_WAIT", 0.1)
    disk_node(nodefs, commands, partitions=3)
    nodefs.remove("/dev/sdb1")  # the swap partition is gone (kept partition table)
    commands.argv_status["mount -t ext4 -o noatime,nodev /dev/sdb2 /scratch"] = 32

    assert boot_with_disk(head, commands, disk_config(wipe="never")) == EXIT_OK

    assert commands.calls == [*mount_commands()[1:], [INIT_D_10X]]
    out = console_lines(capsys)
    assert "qlustar: ERROR: disk /dev/sdb: partition /dev/sdb1 not found" in out
    assert "qlustar: ERROR: disk /dev/sdb: mounting /dev/sdb2 on /scratch failed (status 32)" in out
    assert "qlustar: disk /dev/sdb: mounted /dev/sdb3 on /data" in out
    assert "qlustar: disk setup FAILED" in out
    # Only what is mounted goes to fstab: systemd must not retry (and fail) the others.
    assert node_read("/etc/fstab").decode() == FSTAB + SDB_FSTAB.splitlines(keepends=True)[2]
    assert out[-1] == summary(disks="1 disks (1 failed)")


def test_a_runner_taking_only_argv_still_works(
    nodefs: FakeFilesystem, head: Head, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[list[str]] = []

    def plain(argv: Sequence[str]) -> tuple[int, str]:
        calls.append(list(argv))
        return 0, ""

    disk_node(nodefs, Commands(), partitions=3)
    head.publish(make_bundle([file_entry(DISK_CONFIG, disk_config(wipe="never"))]))
    with as_root():
        assert main([], fetch=head.fetch, run=plain) == EXIT_OK  # type: ignore[arg-type]

    assert calls == [*mount_commands(), [INIT_D_10X]]


def test_disk_config_from_the_renderer_parses(tmp_path: Path) -> None:
    extra = r"""
[[hosts]]
name = "beo-08"
mac = "52:54:00:12:34:5d"
image = "demo"
networks.boot = "10.0.2.22"
options.disk = { device = "/dev/disk/by-id/my disk", label = "dos", wipe = "always", partitions = [
  { size = "512MiB", fs = "swap", label = "sw" },
  { size = "10GiB", fs = "ext4", mount = "/my scratch\\1 2", label = "-", options = "-" },
  { size = "rest", fs = "xfs", mount = "/data/", label = "data_1", options = "noatime,nodiratime" },
] }
"""
    site = load_site(make_site(tmp_path / "site", extra_hosts=extra))
    P = node_disk.Partition
    expected = {
        "beo-01": node_disk.DiskConfig(
            "/dev/sda",
            "gpt",
            "if-unformatted",
            (P(1, 16384, "swap"), P(2, None, "xfs", "/scratch", "scratch", "noatime")),
        ),
        "beo-08": node_disk.DiskConfig(
            "/dev/disk/by-id/my disk",
            "dos",
            "always",
            (
                P(1, 512, "swap", label="sw"),
                P(2, 10240, "ext4", "/my scratch\\1 2", "-", "-"),
                P(3, None, "xfs", "/data", "data_1", "noatime,nodiratime"),
            ),
        ),
    }
    for node, config in expected.items():
        rendered = qb.render_bundle(site, site.host(node))
        (text,) = [f.content for f in rendered.files if f.path == DISK_CONFIG]
        assert node_disk.parse_disk_config(text.decode()) == config, node
    assert node_disk.sfdisk_script(expected["beo-08"]) == (
        "label: dos\nsize=512MiB, type=swap\nsize=10240MiB, type=linux\ntype=linux\n"
    )


def test_run_command_feeds_input(tmp_path: Path) -> None:
    assert run_command(["cat"], input="label: gpt\ntype=linux\n") == (0, "label: gpt\ntype=linux\n")
    assert run_command(["cat"]) == (0, "")  # no input: an empty stdin, not ours
    # A command that reads none of a large input does not block us.
    assert run_command(["true"], input="x" * 1_000_000) == (0, "")


# --------------------------------------------------------------------------------------
# Logging and debug


def test_logs_under_var_log_qlustar(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    head.publish(make_bundle(VALID_FILES))

    assert run_node(head, commands) == EXIT_OK

    assert node_mode("/var/log/qlustar") == "0755"
    log_lines = runner_log().splitlines()
    # Every console line is in the log as well (after a timestamp).
    for line in console_lines(capsys):
        message = line.removeprefix("qlustar: ")
        assert any(entry.endswith(f" {message}") for entry in log_lines), message
    assert any(line.endswith(f" fetching bundle {BUNDLE_URL}") for line in log_lines)
    # Details are in the log even without debug.
    assert any("wrote /root/.ssh/authorized_keys (4 bytes, 0600 0:0)" in x for x in log_lines)
    assert any("net.env: NIC=eth0 IP=10.0.2.15" in x for x in log_lines)


@pytest.mark.parametrize("how", ["cmdline", "argument", "off"])
def test_debug_makes_the_console_verbose(
    how: str,
    nodefs: FakeFilesystem,
    head: Head,
    commands: Commands,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = []
    if how == "cmdline":
        nodefs.remove("/proc/cmdline")
        nodefs.create_file("/proc/cmdline", contents=CMDLINE.strip() + " debug early-shell\n")
    elif how == "argument":
        args = ["--debug"]
    executable(nodefs, "/lib/qlustar/init.d/10-x")
    head.publish(make_bundle(VALID_FILES, [{"kind": "command", "argv": ["/usr/bin/true"]}]))

    assert run_node(head, commands, *args) == EXIT_OK

    out = console_lines(capsys)
    verbose = [
        "qlustar: wrote /root/.ssh/authorized_keys (4 bytes, 0600 0:0)",
        "qlustar: created parent directory /etc/qlustar",
        "qlustar: running /usr/bin/true",
        "qlustar: [10-x] output of 10-x",
    ]
    for line in verbose:
        assert (line in out) == (how != "off"), line
    assert "qlustar: init.d 10-x started" in out


# --------------------------------------------------------------------------------------
# Real processes (no pyfakefs)


def test_real_init_d_scripts_run_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    init_d, log_dir = tmp_path / "init.d", tmp_path / "log"
    init_d.mkdir()
    monkeypatch.setattr(node_paths, "INIT_D_DIR", str(init_d))
    monkeypatch.setattr(node_paths, "LOG_DIR", str(log_dir))
    trace = tmp_path / "trace"
    for name, status in (("10-b", 0), ("02-a", 0), ("50-fails", 7), ("99-z", 0), ("B", 0)):
        script = init_d / name
        script.write_text(
            f'#!/bin/sh\necho "{name} out"\necho "{name} err" >&2\n'
            f'echo {name} >> "{trace}"\nexit {status}\n'
        )
        script.chmod(0o755)
    (init_d / "20-not-executable").write_text(f"#!/bin/sh\necho bad >> {trace}\n")
    cmdline, net_env = tmp_path / "cmdline", tmp_path / "net.env"
    cmdline.write_text(CMDLINE)
    net_env.write_text(NET_ENV)
    me = pwd.getpwuid(os.getuid())
    head = Head()
    target = tmp_path / "etc" / "motd"
    target.parent.mkdir()  # an existing directory: works without root, too
    head.publish(
        make_bundle(
            [
                file_entry(
                    str(target),
                    "hi\n",
                    owner=me.pw_name,
                    group=me.pw_name,
                    uid=os.getuid(),
                    gid=os.getgid(),
                )
            ]
        )
    )
    monkeypatch.undo()  # the real pwd/grp databases, but keep the redirected paths
    monkeypatch.setattr(node_paths, "INIT_D_DIR", str(init_d))
    monkeypatch.setattr(node_paths, "LOG_DIR", str(log_dir))

    status = main(["--cmdline", str(cmdline), "--net-env", str(net_env)], fetch=head.fetch)

    assert status == EXIT_OK
    assert target.read_text() == "hi\n"
    assert trace.read_text().split() == ["02-a", "10-b", "50-fails", "99-z", "B"]
    assert (log_dir / "init.d" / "50-fails.log").read_text() == "50-fails out\n50-fails err\n"
    out = capsys.readouterr().out.splitlines()
    assert "qlustar: init.d 50-fails exited with status 7" in out
    assert out[-1] == (
        "qlustar: runner done: 1 files, 0 actions (0 failed), "
        "0 disks (0 failed), 5 scripts (1 failed)"
    )
    log = (log_dir / "runner.log").read_text()
    assert "[99-z] 99-z err" in log
    assert "init.d 20-not-executable skipped: not executable" in log


def test_run_command_statuses(tmp_path: Path) -> None:
    assert run_command(["sh", "-c", "echo out; echo err >&2; exit 5"]) == (5, "out\nerr\n")
    assert run_command([str(tmp_path / "missing")])[0] == 127
    assert run_command(["sh", "-c", "kill -TERM $$"])[0] == 128 + 15
    # A daemon started in the background keeps its stdout open; that must not block us.
    started = time.monotonic()
    status, output = run_command(["sh", "-c", "sleep 3 & echo started"])
    assert (status, output) == (0, "started\n")
    assert time.monotonic() - started < 2.5


def test_real_http_fetch(tmp_path: Path) -> None:
    node_dir = tmp_path / "qlustar" / "nodes" / MAC_DASHED
    node_dir.mkdir(parents=True)
    data = json.dumps(make_bundle(VALID_FILES)).encode()
    (node_dir / "bundle.json").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    (node_dir / "bundle.json.sha256").write_text(f"{digest}  bundle.json\n")
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}/qlustar"
        try:
            url = node_fetch.bundle_url(base, "52:54:00:12:34:56")
            assert node_fetch.fetch_bundle(url, node_fetch.fetch_url, Reporter()) == (data, digest)
            with pytest.raises(node_fetch.FetchError, match="HTTP 404"):
                node_fetch.fetch_bundle(
                    node_fetch.bundle_url(base, "52:54:00:00:00:00"),
                    node_fetch.fetch_url,
                    Reporter(),
                )
        finally:
            server.shutdown()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_inventory_name_wins_over_a_bundle_file_etc_hostname(
    nodefs: FakeFilesystem, head: Head, commands: Commands
) -> None:
    """README, "Options of a node": the host name is always the inventory name. A bundle
    whose files carry another /etc/hostname (the head refuses to render one) still ends with
    the inventory name in the file and on the running kernel: actions run after the files."""
    executable(nodefs, "/bin/hostname")
    head.publish(
        make_bundle(
            [file_entry("/etc/hostname", "from-rootfs\n")],
            [{"kind": "hostname", "name": "beo-01"}],
        )
    )

    assert run_node(head, commands) == EXIT_OK

    assert node_read("/etc/hostname") == b"beo-01\n"
    assert commands.calls == [["hostname", "beo-01"]]
