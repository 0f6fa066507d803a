"""The fake node the runner's unit tests run on: a pyfakefs file system with
allow_root_user=False (the tests run as root, the fake file system enforces permissions as for
uid 1), a fake pwd/grp database (`node_env`), a head that is a dict of URLs and simulated
commands. A pytest plugin (conftest.py names it): modules that use the fake node's users mark
themselves `pytest.mark.usefixtures("node_env")`."""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import os
import pwd
import stat
import urllib.error
from collections.abc import Callable, Iterator, Sequence
from email.message import Message
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pyfakefs.fake_filesystem import FakeFilesystem
from pyfakefs.fake_filesystem_unittest import Patcher
from pyfakefs.helpers import set_gid, set_uid

from qlimage.node.runner import paths as node_paths
from qlimage.node.runner.main import main

BASE = "http://10.0.2.2:8470/qlustar"
# The executable installed as /usr/lib/qlustar/qlustar-runner; it runs the runner package.
RUNNER_LAUNCHER = Path(__file__).parent.parent / "qlimage/node/qlustar-runner"
MAC_DASHED = "52-54-00-12-34-56"
BUNDLE_URL = f"{BASE}/nodes/{MAC_DASHED}/bundle.json"
CMDLINE = f"BOOT_IMAGE=vmlinuz quiet qlustar.http={BASE} BOOTIF=01-52-54-00-12-34-56\n"
NET_ENV = """\
NIC=eth0
IP=10.0.2.15
SUBNET=255.255.255.0
ROUTER=10.0.2.2
DNS='10.0.2.3 10.0.2.4'
SERVER=10.0.2.2
HOSTNAME=beo-01
"""
FAKE_UID = 1  # what pyfakefs makes us with allow_root_user=False

# The node's user and group databases (pwd/grp are not part of the fake file system).
NODE_USERS = {"root": 0, "munge": 105, "alice": 1000}
NODE_GROUPS = {"root": 0, "munge": 106, "users": 100}


# --------------------------------------------------------------------------------------
# Helpers


def file_entry(
    path: str,
    content: str = "text\n",
    *,
    mode: str = "0644",
    owner: str = "root",
    group: str = "root",
    uid: int = 0,
    gid: int = 0,
    encoding: str = "utf-8",
) -> dict[str, Any]:
    return {
        "path": path,
        "type": "file",
        "mode": mode,
        "owner": owner,
        "group": group,
        "uid": uid,
        "gid": gid,
        "content": content,
        "encoding": encoding,
    }


def dir_entry(path: str, mode: str = "0755", **ids: Any) -> dict[str, Any]:
    entry = {"path": path, "type": "dir", "mode": mode, "owner": "root", "group": "root"}
    return {**entry, "uid": 0, "gid": 0, **ids}


def link_entry(path: str, target: str) -> dict[str, Any]:
    return {"path": path, "type": "symlink", "target": target, "uid": 0, "gid": 0}


def make_bundle(
    files: Sequence[dict[str, Any]] = (),
    actions: Sequence[dict[str, Any]] = (),
    **extra: Any,
) -> dict[str, Any]:
    doc = {"format": 1, "node": "beo-01", "checksum_note": "sha256 of this file"}
    return {**doc, "files": list(files), "actions": list(actions), **extra}


class Head:
    """The head's web server: URL -> bytes; records every request. Once it serves anything,
    an unknown URL is a 404, as from a real web server; before that, nothing answers."""

    def __init__(self) -> None:
        self.documents: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.failures: list[Exception] = []  # raised (in order) before answering

    def publish(self, bundle: dict[str, Any] | bytes, *, checksum: str | None = None) -> str:
        data = bundle if isinstance(bundle, bytes) else json.dumps(bundle, indent=1).encode()
        digest = checksum or hashlib.sha256(data).hexdigest()
        self.documents[BUNDLE_URL] = data
        self.documents[BUNDLE_URL + ".sha256"] = f"{digest}  bundle.json\n".encode()
        return hashlib.sha256(data).hexdigest()

    def fetch(self, url: str) -> bytes:
        self.requests.append(url)
        if self.failures:
            raise self.failures.pop(0)
        if not self.documents:
            raise urllib.error.URLError("Connection refused")
        if url not in self.documents:
            raise urllib.error.HTTPError(url, 404, "Not Found", Message(), None)
        return self.documents[url]


class Commands:
    """Simulated command execution: records argv (and standard input), answers from tables
    of statuses and may simulate a command's effect on the node."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.inputs: list[str | None] = []  # per call: its standard input, if any
        self.status: dict[str, int] = {}  # basename of argv[0] -> exit status
        self.argv_status: dict[str, int] = {}  # the whole command line -> status (first)
        self.effects: dict[str, Callable[[list[str]], None]] = {}  # basename -> side effect
        self.output: dict[str, str] = {}  # basename -> its output (else a made-up two lines)

    def __call__(self, argv: Sequence[str], input: str | None = None) -> tuple[int, str]:
        self.calls.append(list(argv))
        self.inputs.append(input)
        name = os.path.basename(argv[0])
        if name in self.effects:
            self.effects[name](list(argv))
        status = self.argv_status.get(" ".join(argv), self.status.get(name, 0))
        return status, self.output.get(name, f"output of {name}\nsecond line of {name}\n")

    def names(self) -> list[str]:
        return [os.path.basename(c[0]) for c in self.calls]


@contextlib.contextmanager
def as_root() -> Iterator[None]:
    """Inspect the fake node as root: the runner wrote root-only directories."""
    set_uid(0)
    set_gid(0)
    try:
        yield
    finally:
        set_uid(FAKE_UID)
        set_gid(FAKE_UID)


def node_stat(path: str) -> os.stat_result:
    with as_root():
        return os.lstat(path)


def node_read(path: str) -> bytes:
    with as_root():
        return Path(path).read_bytes()


def node_mode(path: str) -> str:
    return f"{stat.S_IMODE(node_stat(path).st_mode):04o}"


def node_owner(path: str) -> tuple[int, int]:
    st = node_stat(path)
    return st.st_uid, st.st_gid


def snapshot(exclude: str = "/var/log/qlustar") -> dict[str, tuple[Any, ...]]:
    """Everything on the fake node, for "nothing was written" checks."""
    state: dict[str, tuple[Any, ...]] = {}
    with as_root():
        for top, dirs, files in os.walk("/"):
            for name in dirs + files:
                path = os.path.join(top, name)
                if path == exclude or path.startswith(exclude + "/"):
                    continue
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    content: Any = os.readlink(path)
                elif stat.S_ISREG(st.st_mode):
                    content = Path(path).read_bytes()
                else:
                    content = None
                state[path] = (st.st_mode, st.st_uid, st.st_gid, content)
    return state


def runner_log() -> str:
    return node_read("/var/log/qlustar/runner.log").decode()


def console_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


# --------------------------------------------------------------------------------------
# Fixtures


@contextlib.contextmanager
def fake_node() -> Iterator[FakeFilesystem]:
    """A fake node after switch_root: cmdline, DHCP lease, a few image directories."""
    with Patcher(allow_root_user=False) as patcher:
        fs = patcher.fs
        assert fs is not None
        assert os.getuid() == FAKE_UID
        fs.create_file("/proc/cmdline", contents=CMDLINE)
        fs.create_file("/run/qlustar/net.env", contents=NET_ENV)
        for directory in ("/etc/systemd/system", "/root", "/var/log", "/usr/bin", "/srv"):
            fs.create_dir(directory)
        fs.create_file("/etc/passwd", contents="root:x:0:0:root:/root:/bin/bash\n")
        yield fs


@pytest.fixture
def nodefs() -> Iterator[FakeFilesystem]:
    with fake_node() as fs:
        yield fs


@pytest.fixture
def node_env(monkeypatch: pytest.MonkeyPatch) -> None:
    def getpwnam(name: str) -> SimpleNamespace:
        if name not in NODE_USERS:
            raise KeyError(f"getpwnam(): name not found: {name!r}")
        return SimpleNamespace(pw_name=name, pw_uid=NODE_USERS[name])

    def getgrnam(name: str) -> SimpleNamespace:
        if name not in NODE_GROUPS:
            raise KeyError(f"getgrnam(): name not found: {name!r}")
        return SimpleNamespace(gr_name=name, gr_gid=NODE_GROUPS[name])

    monkeypatch.setattr(pwd, "getpwnam", getpwnam)
    monkeypatch.setattr(grp, "getgrnam", getgrnam)
    monkeypatch.setattr(node_paths, "RETRY_DELAYS", (0.0, 0.0, 0.0))
    monkeypatch.setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")


@pytest.fixture
def head() -> Head:
    return Head()


@pytest.fixture
def commands() -> Commands:
    return Commands()


def run_node(head: Head, commands: Commands, *argv: str) -> int:
    return main(list(argv), fetch=head.fetch, run=commands)


def executable(fs: FakeFilesystem, path: str, mode: int = 0o755) -> None:
    fs.create_file(path, contents="#!/bin/sh\n", st_mode=stat.S_IFREG | mode)
