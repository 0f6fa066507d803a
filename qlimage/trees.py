"""File trees as data: sorted manifests (how doit sees a tree) and clamped mtimes; paths inside a
root resolved the way the image will see them, so nothing done to a tree ever leaves it."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import os
import shutil
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


# --- paths inside a root, whatever links the tree holds ----------------------------------------

MAX_LINKS = 40  # as the kernel's limit on links followed in one lookup


def resolve_in_root(root: Path, rel: str, *, follow: bool = False, create: bool = False) -> Path:
    """Where `rel` is when `root` is `/`, as in a chroot: a symlink on the way is followed with
    an absolute target starting again at `root` and `..` stopping at it, so the result is below
    `root` whatever links the tree holds (an image's links mean paths in the image, never on
    the head). Every component but the last is then a real directory; the last is followed
    only with `follow` (else it may be a symlink) and may be missing. `create` (for a path
    that names a directory) makes every missing component a directory (0755); without it a
    missing one before the last raises FileNotFoundError."""
    pending = list(reversed(rel.split("/")))  # a stack: the next component is last
    done: list[str] = []
    links = 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            if done:
                done.pop()
            continue
        path = root.joinpath(*done, name)
        last = all(p in ("", ".") for p in pending)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if last and not create:
                done.append(name)
                break
            if not create:
                raise
            os.mkdir(path)
            os.chmod(path, 0o755)
            done.append(name)
            continue
        if stat.S_ISLNK(st.st_mode) and (follow or not last):
            links += 1
            if links > MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
            target = os.readlink(path)
            if target.startswith("/"):
                done = []
            pending.extend(reversed(target.split("/")))
            continue
        if not last and not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
        done.append(name)
    return root.joinpath(*done)


def read_in_root(root: Path, rel: str) -> bytes | None:
    """The content of the regular file `rel` names inside `root` (links resolved in the root,
    see resolve_in_root), or None if there is none there (missing, a directory, a device...)."""
    try:
        path = resolve_in_root(root, rel, follow=True)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    with os.fdopen(fd, "rb") as f:
        # Checked on the open file: no device or fifo is ever read, and no link swapped in.
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return f.read()


def replace_in_root(root: Path, rel: str, data: bytes, mode: int, owner: tuple[int, int]) -> Path:
    """Write `data` as a new regular file at `rel` inside `root` (parents resolved and created
    inside the root). Whatever was there (a hard link into a cache, a symlink) is replaced,
    never written through. Returns the path written."""
    parent, _, name = rel.rstrip("/").rpartition("/")
    directory = resolve_in_root(root, parent, follow=True, create=True) if parent else root
    if not directory.is_dir() or directory.is_symlink():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory))
    path = directory / name
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(path.lstat().st_mode):
            shutil.rmtree(path)
        else:
            path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        os.fchown(fd, *owner)
        os.fchmod(fd, mode)  # after chown, which clears setuid
    return path


def glob_in_root(root: Path, pattern: str) -> list[Path]:
    """The paths below `root` (never `root` itself) matching the glob `pattern` (relative; `*`,
    `?`, `[...]` within a component, `**` for any depth), deepest first. Directories on the way
    are entered only if they are real directories, or links resolving (in the root) to one; the
    last component is matched as it is, so a link, dangling or not, is a match itself."""
    parts = [p for p in pattern.split("/") if p]
    dirs = [root]
    matches: list[Path] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        found: list[Path] = []
        for d in dirs:
            found += _match_component(d, part)
        if last:
            matches = [p for p in found if p != root]
        else:
            entered = [_enter(root, p) for p in found]
            dirs = _unique([d for d in entered if d is not None])
    return sorted(_unique(matches), key=lambda p: os.fsencode(p), reverse=True)


def _unique(paths: list[Path]) -> list[Path]:
    return list(dict.fromkeys(paths))


def _match_component(directory: Path, part: str) -> list[Path]:
    if part == "**":
        return [directory, *(p for p in walk(directory) if _is_real_dir(p))]
    if not any(c in part for c in "*?["):
        path = directory / part
        return [path] if os.path.lexists(path) else []
    with os.scandir(directory) as entries:
        return [directory / e.name for e in entries if fnmatch.fnmatchcase(e.name, part)]


def _is_real_dir(path: Path) -> bool:
    return stat.S_ISDIR(path.lstat().st_mode)


def _enter(root: Path, path: Path) -> Path | None:
    """The real directory inside `root` that `path` stands for, or None."""
    if _is_real_dir(path):
        return path
    try:
        real = resolve_in_root(root, path.relative_to(root).as_posix(), follow=True)
        return real if _is_real_dir(real) else None
    except OSError:
        return None


def remove_in_root(path: Path) -> None:
    """Delete `path` itself: a directory with its contents (links inside are not followed), a
    link as a link (never its target)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return  # went with a directory removed before
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()
