"""Static image customization: the seed's /etc/qlustar/images/{common,<image>}/copy trees.

Precedence, lowest first: module files < overlays/common < overlays/<image>. Each layer may
also carry a `remove` file (one path or glob per line, `#` comments) of paths to delete from the
image before that layer's copy tree is applied: a whiteout for something a module ships that
the site does not want. A removal never touches what the same or a later layer adds.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from qlimage.errors import ConfigError
from qlimage.trees import glob_in_root, remove_in_root, walk

COMMON = "common"


def layers(overlays: Path, image: str) -> list[Path]:
    return [overlays / COMMON, overlays / image]


def removals(layer: Path) -> list[str]:
    """The layer's whiteout patterns, relative to the image root; ConfigError naming the file
    for a line that is not a plain absolute path (no `.`, `..` or empty components)."""
    path = layer / "remove"
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot read: {getattr(e, 'strerror', None) or e}"]) from e
    patterns, problems = [], []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        problem = removal_problem(line)
        if problem:
            problems.append(f"{path}: line {n}: {line!r} {problem}")
        else:
            patterns.append(line.lstrip("/"))
    if problems:
        raise ConfigError(problems)
    return patterns


def removal_problem(line: str) -> str:
    if not line.startswith("/"):
        return "is not an absolute path in the image"
    parts = line[1:].split("/")
    if line == "/" or any(p in ("", ".", "..") for p in parts):
        return "must name a path below / without '.', '..' or empty components"
    if all(p in ("*", "**") for p in parts):
        return "would remove the whole image; name what to remove"
    return ""


def remove_paths(root: Path, patterns: list[str]) -> None:
    """Delete what each pattern matches in the image: links themselves (dangling or not, never
    their targets); directories on the way are those of the image, links among them resolved
    inside it (trees.glob_in_root), so no removal ever leaves the staged tree."""
    for pattern in patterns:
        for path in glob_in_root(root, pattern):
            remove_in_root(path)


def copy_tree(src: Path, root: Path) -> None:
    """Copy `src` over `root` keeping modes, owners, symlinks and hard links (files linked to
    each other in `src` stay one inode); existing directories keep their own attributes (an
    overlay adds files, it does not re-own /etc). A directory of `src` replaces a link in
    `root`, so every directory written into is a real one inside `root`."""
    linked: dict[tuple[int, int], Path] = {}
    for path in walk(src):
        target = root / path.relative_to(src)
        st = path.lstat()
        if stat.S_ISDIR(st.st_mode):
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                target.unlink()
            if not target.exists():
                target.mkdir()
                os.chown(target, st.st_uid, st.st_gid)
                os.chmod(target, st.st_mode & 0o7777)
            continue
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise ConfigError([f"{path}: {SPECIAL}"])
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()  # may be a hard link into the module cache: never write through
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(path), target)
            os.lchown(target, st.st_uid, st.st_gid)
        elif st.st_nlink > 1 and (st.st_dev, st.st_ino) in linked:
            os.link(linked[st.st_dev, st.st_ino], target)
        else:
            copy_file(path, target, st)
            if st.st_nlink > 1:
                linked[st.st_dev, st.st_ino] = target


SPECIAL = "not a regular file, directory or symlink (an overlay holds only those)"


def copy_file(path: Path, target: Path, st: os.stat_result) -> None:
    # O_NOFOLLOW: the walk saw a regular file; a link swapped in since is not followed.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f, target.open("xb") as out:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError([f"{path}: {SPECIAL}"])
        shutil.copyfileobj(f, out)
    os.chown(target, st.st_uid, st.st_gid)
    os.chmod(target, st.st_mode & 0o7777)  # after chown, which clears setuid


def check_layer(layer: Path) -> list[str]:
    """What is wrong with an overlay layer, found before any task: its remove file's lines and
    special files in its copy tree (each problem one line naming its file)."""
    problems: list[str] = []
    try:
        removals(layer)
    except ConfigError as e:
        problems += e.problems
    copy = layer / "copy"
    if copy.is_dir() and not copy.is_symlink():
        for path in walk(copy):
            kind = stat.S_IFMT(path.lstat().st_mode)
            if kind not in (stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK):
                problems.append(f"{path}: {SPECIAL}")
    return problems


def apply_overlays(overlays: Path, image: str, root: Path) -> None:
    for layer in layers(overlays, image):
        remove_paths(root, removals(layer))
        if (layer / "copy").is_dir():
            copy_tree(layer / "copy", root)
