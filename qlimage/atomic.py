"""Write outputs beside their final place and rename them in, so nothing is ever half-written.

Served outputs also get their mtimes clamped to the site's `source_date_epoch` (its schema
promises that of every output): the build names the served trees and the epoch once
(`clamp_outputs_below`), and every writer here clamps what it renames into them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from qlimage.trees import walk

# Every temporary path starts with this, so a build killed at any point leaves only things the
# next build recognises and removes (publish.remove_stale).
TMP_PREFIX = ".qlimage-tmp."

# (served trees, epoch) once the build named them: outputs renamed below one get clamped.
_served: tuple[tuple[Path, ...], int] | None = None


def clamp_outputs_below(roots: Sequence[Path], epoch: int) -> None:
    """From now on, clamp the mtimes of everything written below `roots` to `epoch`. Only the
    served trees: doit reads the mtimes of the build's own state files (manifests) as change."""
    global _served
    _served = (tuple(Path(r).absolute() for r in roots), epoch)


def served_epoch(path: Path) -> int | None:
    """The epoch to clamp `path` to, if it is below a served tree."""
    if _served is None:
        return None
    roots, epoch = _served
    where = Path(path).absolute()
    return epoch if any(where.is_relative_to(r) for r in roots) else None


def clamp_output_tree(path: Path) -> None:
    """Clamp `path` and everything below it (links not followed), if it is a served output."""
    epoch = served_epoch(path)
    if epoch is None:
        return
    for p in [*walk(path), path] if path.is_dir() and not path.is_symlink() else [path]:
        if p.lstat().st_mtime > epoch:
            os.utime(p, (epoch, epoch), follow_symlinks=False)
    clamp_ancestors(path)


@contextlib.contextmanager
def atomic_path(target: Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success rename it onto `target`.

    On any exception the temporary path is removed and `target` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}.", dir=target.parent))
    work = tmp / target.name
    try:
        if directory:
            work.mkdir()
        yield work
        if directory and target.is_dir() and not target.is_symlink():
            # A directory cannot be renamed over a non-empty one: swap via a second rename.
            old = tmp / "old"
            os.rename(target, old)
        clamp_output_tree(work)
        os.replace(work, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    clamp_ancestors(target)  # the mkdirs, the rename and the clean-up touched these


def clamp_ancestors(path: Path) -> None:
    """Clamp the directories above `path` up to its served tree's top: writing (or making a
    directory) below them changed their mtimes, wherever that happened in the build."""
    for parent in Path(path).absolute().parents:
        if served_epoch(parent) is None:
            break
        clamp_one(parent)


def clamp_served_dirs(settled: Path | None = None) -> None:
    """Clamp every directory of the served trees: removing stale entries (old generations,
    nodes that left, configs of removed hosts) and swapping links changed their mtimes after
    the writers above clamped them. Files are clamped when written; directories are few.

    The subdirectories of `settled` are known clamped (each was clamped when written, and is
    as it was when the last build clamped it): they are not visited."""
    if _served is None:
        return
    roots, epoch = _served
    skipped = str(settled.absolute()) if settled else None
    for root in roots:
        if os.path.isdir(root) and not os.path.islink(root):
            clamp_dirs_below(str(root), os.lstat(root), epoch, skipped)


def clamp_dirs_below(path: str, st: os.stat_result, epoch: int, settled: str | None) -> None:
    # A site of 10,000 nodes has as many leaf directories, and this runs after every build that
    # did anything: one lstat each, and a directory is listed only when it has subdirectories.
    # On Linux a directory's link count is 2 + its subdirectories; btrfs says 1 for every
    # directory, which is not 2, so there every directory is listed (as `find -noleaf` does).
    if st.st_mtime > epoch:
        os.utime(path, (epoch, epoch), follow_symlinks=False)
    if st.st_nlink == 2 or path == settled:
        return
    with os.scandir(path) as entries:
        subdirs = [e for e in entries if e.is_dir(follow_symlinks=False)]
    for entry in subdirs:
        if not entry.name.startswith(TMP_PREFIX):
            clamp_dirs_below(entry.path, entry.stat(follow_symlinks=False), epoch, settled)


def clamp_one(path: Path) -> None:
    epoch = served_epoch(path)
    if epoch is not None and path.lstat().st_mtime > epoch:
        os.utime(path, (epoch, epoch), follow_symlinks=False)


def write_bytes(target: Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_path(target) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)  # independent of the umask


def write_text(target: Path, text: str, mode: int = 0o644) -> None:
    write_bytes(target, text.encode(), mode)


def write_text_if_changed(target: Path, text: str, mode: int = 0o644) -> bool:
    """write_text unless `target` already is a regular file of `mode` holding `text` (configs
    that name every node: a build that changed one of them leaves the others, their inodes and
    their readers alone). Whether it wrote."""
    data = text.encode()
    if holds(target, data, mode):
        return False
    write_bytes(target, data, mode)
    return True


def holds(path: Path, data: bytes, mode: int) -> bool:
    """Whether `path` is a regular file (a link is not followed) of `mode` holding `data`."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != mode:
            return False
        if st.st_size != len(data):
            return False
        # O_NOFOLLOW and the inode check: a file swapped for a link since the lstat is not read
        # through; O_NONBLOCK: nor does a FIFO put there block the build.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        now = os.fstat(fd)
        return (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev) and f.read(len(data) + 1) == data


def symlink(target: Path, points_to: str) -> None:
    """Create or replace the symlink `target` -> `points_to` atomically."""
    with atomic_path(target) as tmp:
        os.symlink(points_to, tmp)
