"""The boot test before publishing (`[publish] boot_test = true`): a new image generation boots
in QEMU with a node of the site before `current` moves to it; one that does not boot never
becomes current, and the build says why with the console's tail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlimage.image import boottest

from helpers import qlimage

pytestmark = [pytest.mark.tools, pytest.mark.network, pytest.mark.boot]


def current(site: Path) -> str:
    return (site / "bootfiles/qlustar/images/demo/current").readlink().name


def history(site: Path) -> list[str]:
    return (site / "bootfiles/qlustar/images/demo/history").read_text().split()


def test_only_a_generation_that_boots_becomes_current(built_copy: Path) -> None:
    site = built_copy
    with (site / "site.toml").open("a") as f:
        f.write("\n[publish]\nboot_test = true\nboot_test_timeout = 120\n")
    first = current(site)

    # A generation that boots: tested with the first node of the image, then current.
    motd = site / "overlays/common/copy/etc/motd"
    motd.parent.mkdir(parents=True, exist_ok=True)
    motd.write_text("booted before it was published\n")
    out = qlimage("-C", str(site), "build").stdout
    good = current(site)
    assert good != first, out
    record = json.loads(
        (site / "bootfiles/qlustar/images/demo" / good / boottest.RECORD).read_text()
    )
    assert record["node"] == "beo-01" and record["passed"] is True, record
    # The build's log says what it boots while it boots, and how that ended.
    assert f"boot test: image demo, generation {good}, node beo-01 ..." in out.splitlines(), out
    assert f"boot test: image demo: generation {good} passed in " in out, out

    # A generation that cannot boot (its /bin/sh is gone): built, booted, refused, removed.
    (site / "overlays/common/remove").write_text("/bin/busybox\n")
    proc = qlimage("-C", str(site), "build", check=False)
    assert proc.returncode == 2, proc
    lines = proc.stderr.splitlines()
    assert "failed its boot test with node beo-01" in lines[0], proc.stderr
    assert "the current generation stays" in lines[0]
    assert any("console: " in line for line in lines[1:]), proc.stderr
    assert "Traceback" not in proc.stderr
    assert current(site) == good
    assert history(site)[-1] == good
    generations = {p.name for p in (site / "bootfiles/qlustar/images/demo").iterdir()}
    assert generations <= {*history(site), "current", "history"}, generations
    status = json.loads(qlimage("-C", str(site), "status", "--json").stdout)
    (demo,) = [i for i in status["images"] if i["name"] == "demo"]
    assert demo["generation"] == good and demo["boot_test"]["node"] == "beo-01", demo
