"""Atomic publishing with generations, rollback, stale clean-up and the build lock.

A generation is a directory named by the first 16 hex digits of its content's sha256, so an
identical rebuild publishes nothing new and two builds of the same inputs name it alike.
`current` is a symlink swapped with one rename; nodes first read `current/generation` and then
fetch everything from that fixed directory, so a flip during their download cannot mix two
generations. `history` lists the published generations, oldest first.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from qlimage.atomic import TMP_PREFIX, symlink, write_text
from qlimage.contract import CURRENT, GENERATION, HISTORY
from qlimage.errors import QlimageError
from qlimage.layout import Layout
from qlimage.site import Site
from qlimage.trees import file_digest


def history(root: Path) -> list[str]:
    path = root / HISTORY
    return path.read_text().split() if path.exists() else []


def current(root: Path) -> Path | None:
    link = root / CURRENT
    return link.resolve() if link.is_symlink() and link.exists() else None


def content_name(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0")
        h.update(bytes.fromhex(file_digest(path)))
    return h.hexdigest()[:16]


def fsync_tree(root: Path) -> None:
    """Make the files durable before the rename that makes them reachable."""
    for path in [*root.rglob("*"), root]:
        if path.is_symlink():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(root: Path, build: Callable[[Path], list[Path]], keep: int) -> str:
    """Build a generation with `build(tmpdir)` (returns the files that name it), move it into
    place, make it current and prune to the last `keep` generations. Returns its name."""
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}generation.", dir=root))
    try:
        os.chmod(work, 0o755)
        name = content_name(build(work))
        write_text(work / GENERATION, name + "\n")
        fsync_tree(work)
        if not (root / name).is_dir():
            os.rename(work, root / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    make_current(root, name)
    prune(root, keep)
    return name


def make_current(root: Path, name: str) -> None:
    symlink(root / CURRENT, name)
    entries = [g for g in history(root) if g != name] + [name]
    write_text(root / HISTORY, "".join(f"{g}\n" for g in entries))


def prune(root: Path, keep: int) -> None:
    entries = history(root)
    cur = os.readlink(root / CURRENT) if (root / CURRENT).is_symlink() else None
    drop = [g for g in entries[: max(0, len(entries) - keep)] if g != cur]
    for g in drop:
        shutil.rmtree(root / g, ignore_errors=True)
    if drop:
        write_text(root / HISTORY, "".join(f"{g}\n" for g in entries if g not in drop))


def rollback(root: Path) -> str:
    """Make the generation before the current one current again; drop the current one."""
    entries = [g for g in history(root) if (root / g).is_dir()]
    cur = os.readlink(root / CURRENT) if (root / CURRENT).is_symlink() else None
    if cur is None or len(entries) < 2 or entries[-1] != cur:
        known = ", ".join(entries) or "empty"
        raise QlimageError(f"{root}: no previous generation to roll back to (history: {known})")
    previous = entries[-2]
    symlink(root / CURRENT, previous)
    write_text(root / HISTORY, "".join(f"{g}\n" for g in entries[:-1]))
    shutil.rmtree(root / cur, ignore_errors=True)
    return previous


def rollback_image(site: Site, image: str, *, wait: bool = True) -> str:
    """Roll the site's `image` back under the build lock; returns the generation now current."""
    if image not in site.images:
        raise QlimageError(
            f"unknown image {image!r} (images.d has: {', '.join(sorted(site.images)) or 'none'})"
        )
    with build_lock(site.paths.bootfiles, wait=wait):
        return rollback(Layout(site).image_root(image))


def remove_stale(root: Path) -> list[Path]:
    """Delete what killed builds left behind: every temporary directory of atomic_path."""
    stale: list[Path] = []
    if not root.is_dir():
        return stale
    layout = Layout(root)
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        for d in list(dirnames):
            if d.startswith(TMP_PREFIX):
                shutil.rmtree(here / d, ignore_errors=True)
                stale.append(here / d)
                dirnames.remove(d)
            elif depth >= SCAN_DEPTH or here / d == layout.kernel_dir or here == layout.stage_dir:
                # Temporaries live beside their target, at most three levels down; staged
                # trees, generations and caches hold none of their own and are large.
                dirnames.remove(d)
    return stale


# The sites whose build lock this process holds (flock would block on a second open file).
_HELD: set[Path] = set()
SCAN_DEPTH = 3


@contextlib.contextmanager
def build_lock(bootfiles: Path, *, wait: bool = True) -> Iterator[None]:
    """Serialize builds of one site; with wait=False a held lock is a clear error.

    Reentrant within a process: a command that holds the lock (the apt hook compares the
    images before and after) may call `run_graph`, which takes it again."""
    key = bootfiles.resolve()
    if key in _HELD:
        yield
        return
    bootfiles.mkdir(parents=True, exist_ok=True)
    fd = os.open(Layout(bootfiles).lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise QlimageError(
                f"{bootfiles}: another build of this site is running",
                hint="wait for it, or run without --no-wait to queue behind it",
            ) from None
        # The marker outlives a killed build: only then is there anything to clean up, and the
        # scan (thousands of node directories) is skipped on every clean run.
        running = Layout(bootfiles).running
        if running.exists():
            remove_stale(bootfiles)
        running.touch()
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
            running.unlink(missing_ok=True)  # not reached when the build is killed
    finally:
        os.close(fd)
