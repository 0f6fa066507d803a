"""Generations: atomic publishing, rollback, pruning, the build lock, and SIGKILL at any point."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlimage.errors import QlimageError
from qlimage.image import publish

from helpers import REPO, qlimage


def make_build(content: bytes):  # type: ignore[no-untyped-def]
    def build(gen: Path) -> list[Path]:
        (gen / "x.img").write_bytes(content)
        return [gen / "x.img"]

    return build


def test_publish_makes_current_and_history(tmp_path: Path) -> None:
    root = tmp_path / "img"
    a = publish.publish(root, make_build(b"a"), keep=3)
    assert (root / "current").readlink().as_posix() == a
    assert (root / a / "generation").read_text() == f"{a}\n"
    b = publish.publish(root, make_build(b"b"), keep=3)
    assert publish.history(root) == [a, b]
    assert publish.current(root) == (root / b).resolve()


def test_identical_rebuild_publishes_nothing_new(tmp_path: Path) -> None:
    root = tmp_path / "img"
    a = publish.publish(root, make_build(b"same"), keep=3)
    assert publish.publish(root, make_build(b"same"), keep=3) == a
    assert publish.history(root) == [a]
    assert not [p for p in root.iterdir() if p.name.startswith(".qlimage-tmp")]


def test_prune_keeps_last_n(tmp_path: Path) -> None:
    root = tmp_path / "img"
    gens = [publish.publish(root, make_build(bytes([i])), keep=2) for i in range(4)]
    assert publish.history(root) == gens[-2:]
    assert sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink()) == sorted(
        gens[-2:]
    )


def test_rollback(tmp_path: Path) -> None:
    root = tmp_path / "img"
    a = publish.publish(root, make_build(b"a"), keep=3)
    b = publish.publish(root, make_build(b"b"), keep=3)
    assert publish.rollback(root) == a
    assert (root / "current").readlink().as_posix() == a
    assert not (root / b).exists()
    with pytest.raises(QlimageError, match="no previous generation"):
        publish.rollback(root)


def test_failed_build_leaves_current_intact(tmp_path: Path) -> None:
    root = tmp_path / "img"
    a = publish.publish(root, make_build(b"a"), keep=3)

    def broken(gen: Path) -> list[Path]:
        (gen / "x.img").write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        publish.publish(root, broken, keep=3)
    assert (root / "current").readlink().as_posix() == a
    assert sorted(p.name for p in root.iterdir()) == sorted([a, "current", "history"])


def test_lock_no_wait_is_a_clear_error(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from pathlib import Path\n"
            "from qlimage.image.publish import build_lock\n"
            "with build_lock(Path(sys.argv[1])):\n print('locked', flush=True); time.sleep(30)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with (
            pytest.raises(QlimageError, match="another build of this site is running"),
            publish.build_lock(tmp_path, wait=False),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with publish.build_lock(tmp_path, wait=False):
        pass  # free again once the holder is gone


def image_verifies(site: Path, image: str) -> bool:
    cur = site / "bootfiles/qlustar/images" / image / "current"
    if not cur.is_symlink() or not cur.exists():
        return False
    gen = cur.resolve()
    want = (gen / f"{image}.img.sha256").read_text().split()[0]
    have = hashlib.sha256((gen / f"{image}.img").read_bytes()).hexdigest()
    return want == have and (gen / "generation").read_text().strip() == gen.name


@pytest.mark.tools
@pytest.mark.network
def test_sigkill_at_any_point_keeps_current_generation(built_copy: Path) -> None:
    site = built_copy
    qlimage("-C", str(site), "build")  # the copy's doit state names the original's files
    first = (site / "bootfiles/qlustar/images/demo/current").readlink()
    motd = site / "overlays/common/copy/etc/motd"
    motd.parent.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "qlimage", "-C", str(site), "build"]
    # How long a rebuild after an overlay edit takes, then kill rebuilds spread over that span.
    motd.write_text("probe\n")
    start = time.monotonic()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    span = time.monotonic() - start
    for i, fraction in enumerate((0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95)):
        motd.write_text(f"edit {i}\n")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(span * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert image_verifies(site, "demo"), f"current generation broken after kill at {fraction}"
    motd.write_text("final\n")
    out = qlimage("-C", str(site), "build").stdout
    assert "squashfs:demo" in out
    assert image_verifies(site, "demo")
    assert (site / "bootfiles/qlustar/images/demo/current").readlink() != first
    leftovers = [p for p in (site / "bootfiles").rglob(".qlimage-tmp.*")]
    assert leftovers == [], leftovers
    assert qlimage("-C", str(site), "build").stdout.count("\n.  ") == 0
