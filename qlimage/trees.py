"""File trees as data: sorted manifests (how doit sees a tree) and clamped mtimes."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path


def walk(root: Path) -> Iterator[Path]:
    """Every path below `root` (not `root` itself), sorted byte-wise, without following links."""
    entries = sorted(os.scandir(root), key=lambda e: os.fsencode(e.name))
    for entry in entries:
        path = Path(entry.path)
        yield path
        if entry.is_dir(follow_symlinks=False):
            yield from walk(path)


def file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest_line(root: Path, path: Path, *, content: bool = True) -> str:
    st = path.lstat()
    rel = path.relative_to(root).as_posix()
    kind = stat.S_IFMT(st.st_mode)
    if kind == stat.S_IFLNK:
        what = "-> " + os.readlink(path)
    elif kind == stat.S_IFREG:
        what = file_digest(path) if content else f"{st.st_size}:{st.st_mtime_ns}"
    else:
        what = "-"
    return f"{st.st_mode:06o}\t{st.st_uid}:{st.st_gid}\t{what}\t{rel}"


def manifest(root: Path, *, content: bool = True) -> str:
    """One tab-separated line per path: mode, owner, digest or link target, relative path.

    Any change doit should notice in a tree (content, mode, owner, add, remove, rename) changes
    this text, so a tree enters the task graph as this one file. `content=False` trades the
    digest for size and mtime, for trees too large to hash on every run.
    """
    if not root.exists():
        return ""
    return "".join(manifest_line(root, p, content=content) + "\n" for p in walk(root))


def clamp_mtimes(root: Path, epoch: int) -> None:
    """Set every mtime in `root` (itself included) to at most `epoch`, links not followed."""
    for path in [*walk(root), root]:
        st = path.lstat()
        if st.st_mtime > epoch:
            os.utime(path, (epoch, epoch), follow_symlinks=False)
