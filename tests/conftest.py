"""Shared fixtures: small real sites built in tmp_path with the real pipeline."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
QLIMAGE = [sys.executable, "-m", "qlimage"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SITE_TOML = """\
[site]
name = "test"
source_date_epoch = 1700000000

[head]
address = "10.0.2.2"
http_port = {port}

[networks.boot]
cidr = "10.0.2.0/24"
gateway = "10.0.2.2"
boot = true

[boot]
default = "fallback"

[bootconfigs.compute]
image = "demo"
append = "debug"

[bootconfigs.fallback]
image = "demo"
"""

IMAGE_TOML = """\
name = "demo"
flavor = "bookworm"
version = "11"
modules = ["core"]
"""

ADMIN_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk7Jc4LkQ1wY8+3x2lqj4mGQ0bqGv6mZ7W3aQbqK0Yd admin@head"
)

NODES_TOML = """\
[optionsets.compute]
rootfs = ["tweaks"]
authorized_keys = ["{key}"]

[groups.rack1]
optionsets = ["compute"]

[[hosts]]
name = "beo-01"
mac = "52:54:00:12:34:56"
bootconfig = "compute"
groups = ["rack1"]
networks.boot = {{ address = "10.0.2.15", aliases = ["node1"] }}

[[hosts]]
name = "beo-02"
mac = "52:54:00:12:34:57"
image = "demo"
networks.boot = "10.0.2.16"
"""


def write_site(root: Path, *, port: int | None = None) -> Path:
    """A test site using the demo's core recipe (Debian packages from the cached archive)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "site.toml").write_text(SITE_TOML.format(port=port or free_port()))
    (root / "images.d").mkdir(exist_ok=True)
    (root / "images.d/demo.toml").write_text(IMAGE_TOML)
    (root / "nodes.d").mkdir(exist_ok=True)
    (root / "nodes.d/cluster.toml").write_text(NODES_TOML.format(key=ADMIN_KEY))
    shutil.copytree(REPO / "modules/core", root / "modules/core", dirs_exist_ok=True)
    write_rootfs_config(root / "rootfs/tweaks")
    return root


# Root FS Customization scripts write to the console so a boot test can see them run, in order.
SCRIPT = """#!/bin/sh
echo "qlustar-test: {name} ran" > /dev/console
{extra}
"""


def write_rootfs_config(top: Path) -> None:
    """Two init.d scripts and a file owned by daemon (uid 1 in the core module) with mode 0640."""
    initd = top / "lib/qlustar/init.d"
    initd.mkdir(parents=True, exist_ok=True)
    for name, extra in (
        ("10-first", ""),
        (
            "20-second",
            "echo \"qlustar-test: secret $(stat -c '%U:%G %a' /etc/qlustar/secret)\""
            " > /dev/console\n"
            "[ -e /opt/chroot-marker ] &&"
            ' echo "qlustar-test: chroot says $(cat /opt/chroot-marker)" > /dev/console; true',
        ),
    ):
        path = initd / name
        path.write_text(SCRIPT.format(name=name, extra=extra))
        os.chmod(path, 0o755)
    secret = top / "etc/qlustar/secret"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("only for daemon\n")
    os.chown(secret, 1, 1)
    os.chmod(secret, 0o640)
    for d in (top, *[p for p in top.rglob("*") if p.is_dir()]):
        os.chmod(d, 0o755)


def qlimage(
    *args: str, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [*QLIMAGE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"qlimage {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="session")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test site, built once per session with `qlimage build`."""
    root = write_site(tmp_path_factory.mktemp("site"))
    qlimage("-C", str(root), "build")
    return root


@pytest.fixture
def site_factory(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str = "site", **kw: object) -> Path:
        return write_site(tmp_path / name, **kw)  # type: ignore[arg-type]

    return make
