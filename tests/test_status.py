"""`qlimage status` on a built site, checked against the real outputs: generations, checksum
files, sizes and modules.json; a pending rebuild naming the overlay file that changed; a
hand-edited generation (made by the real `qlimage edit -s`); and the generation each node last
fetched, from access log lines in the exact format our nginx template writes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qlimage import contract
from qlimage.image import publish
from qlimage.layout import Layout
from qlimage.serve import nginx
from qlimage.site import load_site

from helpers import QLIMAGE, REPO, assert_refused, qlimage, write

pytestmark = pytest.mark.tools

MOTD = "qlimage status test\n"
TEMPLATE = REPO / "qlimage/serve/templates/nginx.conf.j2"


def status(site: Path, *args: str) -> dict[str, Any]:
    proc = qlimage("-C", str(site), "status", "--json", *args)
    data: dict[str, Any] = json.loads(proc.stdout)  # valid JSON or the test fails here
    return data


def image_entry(data: dict[str, Any], name: str = "demo") -> dict[str, Any]:
    (entry,) = [i for i in data["images"] if i["name"] == name]
    return entry


def node_entry(data: dict[str, Any], name: str) -> dict[str, Any]:
    (entry,) = [n for n in data["nodes"] if n["name"] == name]
    return entry


def access_line(t: float, addr: str, uri: str, status: int = 200, size: int = 1234) -> str:
    """One request as the template's `log_format qlimage escape=json` writes it."""
    return f'{{"time":{t:.3f},"addr":"{addr}","uri":"{uri}","status":{status},"bytes":{size}}}\n'


def test_the_access_line_format_is_the_templates() -> None:
    # The lines the tests write are only realistic while the template says the same.
    template = TEMPLATE.read_text()
    fmt = (
        "log_format qlimage escape=json "
        """'{"time":$msec,"addr":"$remote_addr","uri":"$request_uri","status":$status,"""
        """"bytes":$body_bytes_sent}';"""
    )
    assert fmt in template
    line = access_line(1700000000.5, "10.0.2.15", "/qlustar/images/demo/abc/demo.img.sha256")
    assert nginx.parse_access(line) == nginx.Access(
        1700000000.5, "10.0.2.15", "/qlustar/images/demo/abc/demo.img.sha256", 200, 1234
    )


def test_json_reports_the_published_outputs(built_site: Path) -> None:
    data = status(built_site)
    layout = Layout(load_site(built_site))
    root = layout.image_root("demo")
    gen = os.readlink(root / contract.CURRENT)
    demo = image_entry(data)
    assert demo["generation"] == gen
    assert demo["history"] == (root / contract.HISTORY).read_text().split()
    sum_text = (root / gen / contract.image_sum_file("demo")).read_text()
    assert demo["sha256"] == sum_text.split()[0]
    assert demo["size"] == (root / gen / contract.image_file("demo")).stat().st_size
    published = json.loads((root / gen / contract.MODULES_JSON).read_text())["modules"]
    assert demo["modules"]["published"] == published
    assert demo["modules"]["resolved"] == published  # nothing new in the pool
    assert [m["module"] for m in published] == ["core"]
    assert demo["hand_edited"] is False and demo["hand_edit"] is None
    assert demo["rebuild_pending"] is False, demo["reasons"]
    assert demo["reasons"] == []
    assert demo["nodes"] == ["beo-01", "beo-02"]  # beo-01 by boot config, beo-02 by image
    boot_gen = os.readlink(layout.boot_current)
    assert data["boot"]["generation"] == boot_gen
    assert data["boot"]["initrd_size"] == layout.initrd.stat().st_size
    assert data["boot"]["kernel_size"] == layout.vmlinuz.stat().st_size
    assert data["boot"]["rebuild_pending"] is False, data["boot"]["reasons"]
    assert data["boot"]["hand_edited"] is False
    assert data["build_running"] is False
    beo1 = node_entry(data, "beo-01")
    assert (beo1["address"], beo1["image"], beo1["bootconfig"]) == ("10.0.2.15", "demo", "compute")
    assert beo1["current_generation"] == gen
    # No `qlimage serve` has run: no log, so no node's last fetch is known.
    assert data["access_log"]["exists"] is False
    assert all(n["last_fetch"] is None and n["stale"] is None for n in data["nodes"])

    table = qlimage("-C", str(built_site), "status").stdout
    assert f"demo   {gen}  {demo['sha256'][:16]}" in table
    assert "no access log" in table


def test_overlay_change_is_a_pending_rebuild_naming_the_file(built_copy: Path) -> None:
    # A copy rebuilds once (its doit state names the template's paths): settle it first.
    qlimage("-C", str(built_copy), "build")
    before = image_entry(status(built_copy))
    assert before["rebuild_pending"] is False, before["reasons"]

    write(built_copy / "overlays/common/copy/etc/motd", MOTD)
    after = image_entry(status(built_copy))
    assert after["rebuild_pending"] is True
    assert after["reasons"][0] == "overlay file overlays/common/copy/etc/motd changed"
    assert not [r for r in after["reasons"][1:] if "overlay" in r], after["reasons"]
    assert after["generation"] == before["generation"]  # status builds nothing
    table = qlimage("-C", str(built_copy), "status").stdout
    assert "why rebuild: overlay file overlays/common/copy/etc/motd changed" in table

    qlimage("-C", str(built_copy), "build")
    rebuilt = image_entry(status(built_copy))
    assert rebuilt["rebuild_pending"] is False, rebuilt["reasons"]
    assert rebuilt["generation"] != before["generation"]

    # A root password of the image's own (the seed's qlustar-image-reconfigure), not built yet.
    proc = subprocess.run(
        [*QLIMAGE, "-C", str(built_copy), "reconfigure", "demo", "--password-stdin", "--no-build"],
        input="a-new-root-password\n", env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    reasons = image_entry(status(built_copy))["reasons"]
    assert "the root password changed (images.d/demo.rootpw, else the head's)" in reasons
    assert not [r for r in reasons if "overlay" in r or "module" in r], reasons


def test_a_newer_module_version_is_a_pending_rebuild(built_copy: Path) -> None:
    # The recipe now makes core 11.0.3: the image resolves to it before it is even built.
    recipe = built_copy / "modules/core/recipe.toml"
    recipe.write_text(recipe.read_text().replace('version = "11.0.2"', 'version = "11.0.3"'))
    data = status(built_copy)
    demo = image_entry(data)
    assert [m["version"] for m in demo["modules"]["published"]] == ["11.0.2"]
    assert [m["version"] for m in demo["modules"]["resolved"]] == ["11.0.3"]
    assert demo["rebuild_pending"] is True
    assert demo["reasons"][0] == "module core resolves to 11.0.3 (published: 11.0.2)"
    assert "module core: package not built yet (modules/core/recipe.toml)" in demo["reasons"]
    table = qlimage("-C", str(built_copy), "status").stdout
    assert "modules published: core 11.0.2" in table
    assert "modules resolved now: core 11.0.3" in table


def test_nodes_last_fetch_and_stale(built_copy: Path, tmp_path: Path) -> None:
    """beo-01 last fetched the generation before a hand edit (stale), beo-02 the edited one."""
    old = image_entry(status(built_copy))["generation"]
    shell = tmp_path / "shell"
    shell.write_text("#!/bin/sh\nprintf 'by hand\\n' > etc/motd\n")
    shell.chmod(0o755)
    env = dict(os.environ, SHELL=str(shell), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [*QLIMAGE, "-C", str(built_copy), "edit", "-s", "demo", "--no-build"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    edited = image_entry(status(built_copy))
    new = edited["generation"]
    assert new != old
    assert edited["hand_edited"] is True
    assert edited["hand_edit"] == {"part": "squashfs", "base": old, "image": "demo"}

    log = Layout(load_site(built_copy)).head_run / nginx.ACCESS_LOG
    images = "/qlustar/images/demo"
    write(
        log,
        access_line(1800000000.0, "10.0.2.15", f"{images}/current/generation")
        + access_line(1800000000.1, "10.0.2.15", f"{images}/{old}/demo.img.sha256")
        + access_line(1800000000.2, "10.0.2.15", f"{images}/{old}/demo.img", size=10**8)
        + access_line(1800000001.0, "10.0.2.16", f"{images}/{old}/demo.img.sha256")
        + access_line(1800000002.0, "10.0.2.16", f"{images}/{new}/demo.img.sha256?x=1")
        # Later, but not a fetch of a generation: a 404, and the `current` indirection.
        + access_line(1800000003.0, "10.0.2.16", f"{images}/{old}/demo.img", status=404)
        + access_line(1800000004.0, "10.0.2.15", f"{images}/current/generation")
        + access_line(1800000005.0, "10.0.2.99", f"{images}/{old}/demo.img")  # no node
        # The raw URI of a request nginx resolved to the new image: not a plain name, ignored.
        + access_line(1800000006.0, "10.0.2.15", f"{images}/%1b%5b31m/..%2f/{new}/demo.img"),
    )
    data = status(built_copy)
    beo1, beo2 = node_entry(data, "beo-01"), node_entry(data, "beo-02")
    assert beo1["last_fetch"]["generation"] == old
    assert beo1["last_fetch"]["time"] == 1800000000.2
    assert beo1["stale"] is True
    assert beo2["last_fetch"]["generation"] == new
    assert beo2["stale"] is False
    assert data["access_log"]["exists"] is True
    assert data["access_log"]["skipped_lines"] == 0

    stale_only = status(built_copy, "--stale")
    assert [n["name"] for n in stale_only["nodes"]] == ["beo-01"]
    table = qlimage("-C", str(built_copy), "status").stdout
    (row,) = [line for line in table.splitlines() if line.startswith("beo-01 ")]
    assert row.split()[-1] == "STALE" and old in row
    assert "\x1b" not in table
    (demo_row,) = [line for line in table.splitlines() if line.startswith("demo ")]
    assert demo_row.split()[5] == "yes"  # HAND-EDITED (SIZE is two words)


def test_broken_and_huge_logs_do_not_crash(built_copy: Path) -> None:
    log = Layout(load_site(built_copy)).head_run / nginx.ACCESS_LOG
    gen = image_entry(status(built_copy))["generation"]
    sha = f"/qlustar/images/demo/{gen}/demo.img.sha256"
    # 2 GiB of holes (read as NUL bytes, never stored), garbage and cut lines, then one fetch.
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as f:
        f.truncate(2 * 1024**3)
        f.seek(0, os.SEEK_END)
        f.write(b"\n")  # the NUL "line" ends: the tail's first line is cut, and dropped
        f.write(b"\xff\xfe not json /qlustar/images/demo/x/y\n")
        f.write(b'{"time":1,"addr":"10.0.2.15","uri":"/qlustar/images/demo/' + b"a" * 5000 + b"\n")
        f.write(b'{"time":"soon","addr":"10.0.2.15","uri":"/qlustar/images/demo/x/y"}\n')
        f.write(access_line(1800000000.0, "10.0.2.15", sha).encode())
        f.write(b'{"time":1800000009.0,"addr":"10.0.2.16","uri":"/qlustar/images/de')  # cut
    data = status(built_copy)
    assert data["access_log"]["read_bytes"] == 64 * 1024 * 1024  # a bounded tail
    assert data["access_log"]["skipped_lines"] == 4
    beo1, beo2 = node_entry(data, "beo-01"), node_entry(data, "beo-02")
    assert beo1["last_fetch"]["generation"] == gen and beo1["stale"] is False
    assert beo2["last_fetch"] is None and beo2["stale"] is None

    # Not a regular file (a FIFO would block a plain open): reported, not fatal.
    log.unlink()
    os.mkfifo(log)
    data = status(built_copy)
    assert data["access_log"]["problem"] == "not a regular file"
    assert all(n["last_fetch"] is None for n in data["nodes"])
    # A link is not followed.
    log.unlink()
    log.symlink_to("/etc/shadow")
    data = status(built_copy)
    assert data["access_log"]["problem"] is not None
    assert "access log" in qlimage("-C", str(built_copy), "status").stdout


def test_torn_doit_state_is_unknown_not_a_crash(built_copy: Path) -> None:
    state = Layout(load_site(built_copy)).doit_state
    state.write_text(state.read_text()[:100])  # as a build killed while writing it leaves it
    demo = image_entry(status(built_copy))
    assert demo["rebuild_pending"] is None
    assert demo["reasons"] == ["doit's state is unreadable (a build is writing it?)"]
    assert len(state.read_text()) == 100  # status never repairs nor writes it


def quick_status(site: Path, *args: str) -> str:
    """`qlimage status` bounded to two minutes: one that waited for the build lock times out."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [*QLIMAGE, "-C", str(site), "status", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_status_does_not_wait_for_a_running_build(built_copy: Path) -> None:
    bootfiles = load_site(built_copy).paths.bootfiles
    with publish.build_lock(bootfiles, wait=False):  # as a build holds it while it runs
        data = json.loads(quick_status(built_copy, "--json"))
        table = quick_status(built_copy)
    assert data["build_running"] is True
    assert image_entry(data)["generation"] is not None
    assert "a build is running" in table
    assert status(built_copy)["build_running"] is False


def test_unknown_image_is_one_line(built_copy: Path) -> None:
    proc = assert_refused(built_copy, "status", "--image", "nosuch", names="--image")
    assert "nosuch" in proc.stderr and "demo" in proc.stderr
    data = status(built_copy, "--image", "demo")
    assert [i["name"] for i in data["images"]] == ["demo"]
