"""The doit graph on a real site: no-op reruns, reproducibility across directories, `doit list`."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import qlimage

pytestmark = [pytest.mark.tools, pytest.mark.network]

OUTPUTS = [
    "qlustar/images/demo/current/demo.img",
    "qlustar/images/demo/current/demo.img.sha256",
    "qlustar/images/demo/current/modules.json",
    "qlustar/images/demo/current/generation",
    "qlustar/images/demo/history",
    "qlustar/boot/current/initrd.img",
    "qlustar/boot/current/vmlinuz",
    "qlustar/boot/history",
    "pxelinux.cfg/default",
    "pxelinux.cfg/compute",
    "pxelinux.cfg/fallback",
    "pxelinux.cfg/demo",
    "tftpboot/pxelinux.0",
    "tftpboot/ldlinux.c32",
]


def executed(doit_output: str) -> list[str]:
    """Task names doit ran ('.  name'); up-to-date ones print '-- name'."""
    return re.findall(r"^\.  (\S+)", doit_output, re.M)


def test_second_build_executes_nothing(built_site: Path) -> None:
    out = qlimage("-C", str(built_site), "build").stdout
    assert executed(out) == [], out
    assert "-- squashfs:demo" in out


def test_outputs_are_in_place(built_site: Path) -> None:
    boot = built_site / "bootfiles"
    for rel in OUTPUTS:
        assert (boot / rel).is_file(), rel
    links = {
        p.name: p.readlink().as_posix() for p in (boot / "pxelinux.cfg").iterdir() if p.is_symlink()
    }
    assert links == {"0A00020F": "compute", "0A000210": "demo"}
    assert (boot / "tftpboot/pxelinux.cfg").readlink().as_posix() == "../pxelinux.cfg"
    assert (boot / "tftpboot/qlustar").readlink().as_posix() == "../qlustar"
    modules = json.loads((boot / "qlustar/images/demo/current/modules.json").read_text())
    assert [m["module"] for m in modules["modules"]] == ["core"]
    assert modules["modules"][0]["version"] == "11.0.2"  # modules/core/recipe.toml
    gen = (boot / "qlustar/images/demo/current/generation").read_text().strip()
    assert (boot / "qlustar/images/demo/current").readlink().as_posix() == gen


@pytest.mark.boot  # builds the whole site a second time
def test_two_builds_in_different_directories_are_identical(
    built_site: Path, site_factory: Callable[..., Path]
) -> None:
    other = site_factory("other")
    shutil.copy(built_site / "site.toml", other / "site.toml")  # same port, same kernel cmdline
    qlimage("-C", str(other), "build")
    for rel in OUTPUTS:
        a = (built_site / "bootfiles" / rel).read_bytes()
        b = (other / "bootfiles" / rel).read_bytes()
        assert a == b, f"{rel} differs between two builds of the same inputs"


def test_doit_list_explains_every_task(built_site: Path) -> None:
    out = qlimage("-C", str(built_site), "doit", "list", "--all").stdout
    lines = dict(line.split(None, 1) for line in out.splitlines() if line.strip())
    for task in (
        "kernel",
        "initrd",
        "tftpboot",
        "module",
        "module:core",
        "stage",
        "stage:demo",
        "squashfs",
        "squashfs:demo",
        "pxelinux",
        "pxelinux:configs",
        "pxelinux:links",
    ):
        assert task in lines and lines[task].strip(), f"{task} has no description:\n{out}"
