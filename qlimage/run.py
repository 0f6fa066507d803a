"""The one subprocess wrapper: list-form commands, a missing tool names its Debian package."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from qlimage.errors import BuildError, ToolMissing

# Which Debian package provides each external program we call, so that a missing tool
# tells the admin exactly what to install.
DEBIAN_PACKAGE = {
    "mksquashfs": "squashfs-tools",
    "unsquashfs": "squashfs-tools",
    "cpio": "cpio",
    "dpkg-deb": "dpkg",
    "dpkg": "dpkg",
    "apt-get": "apt",
    "qemu-system-x86_64": "qemu-system-x86",
    "dnsmasq": "dnsmasq-base",
    "udp-sender": "udpcast",
    "udp-receiver": "udpcast",
    "gethostip": "syslinux-utils",
    "systemd-analyze": "systemd",
    "systemd-escape": "systemd",
    "ifquery": "ifupdown",
    "ssh-keygen": "openssh-client",
    "diffoscope": "diffoscope",
    "zstd": "zstd",
    "xz": "xz-utils",
    "gpgv": "gpgv",
}


def find_tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        package = DEBIAN_PACKAGE.get(name, name)
        raise ToolMissing(f"{name}: command not found", hint=f"apt-get install {package}")
    return path


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    unset: Sequence[str] = (),
    input: bytes | None = None,
    capture: bool = False,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run `cmd` (never through a shell). Failures raise BuildError with the tool's stderr."""
    argv = [str(c) for c in cmd]
    argv[0] = find_tool(argv[0]) if "/" not in argv[0] else argv[0]
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    for name in unset:
        full_env.pop(name, None)
    proc = subprocess.run(
        argv,
        cwd=cwd,
        env=full_env,
        input=input,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE,
    )
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        tail = err[-1] if err else "no error output"
        raise BuildError(f"{Path(argv[0]).name} failed with status {proc.returncode}: {tail}")
    return proc
