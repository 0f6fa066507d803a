"""Static image customization: the seed's /etc/qlustar/images/{common,<image>}/copy trees.

Precedence, lowest first: module files < overlays/common < overlays/<image>. Each layer may
also carry a `remove` file (one path or glob per line, `#` comments) of paths to delete from the
image before that layer's copy tree is applied: a whiteout for something a module ships that
the site does not want. A removal never touches what the same or a later layer adds.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from qlimage.errors import ConfigError
from qlimage.trees import walk

COMMON = "common"


def layers(overlays: Path, image: str) -> list[Path]:
    return [overlays / COMMON, overlays / image]


def removals(layer: Path) -> list[str]:
    path = layer / "remove"
    if not path.exists():
        return []
    patterns = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not line.startswith("/") or "/../" in f"{line}/":
            raise ConfigError([f"{path}: line {n}: {line!r} is not an absolute path in the image"])
        patterns.append(line.lstrip("/"))
    return patterns


def remove_paths(root: Path, patterns: list[str]) -> None:
    for pattern in patterns:
        for path in sorted(root.glob(pattern), reverse=True):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def copy_tree(src: Path, root: Path) -> None:
    """Copy `src` over `root` keeping modes, owners and symlinks; existing directories keep
    their own attributes (an overlay adds files, it does not re-own /etc)."""
    for path in walk(src):
        target = root / path.relative_to(src)
        st = path.lstat()
        if path.is_dir() and not path.is_symlink():
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                target.unlink()
            if not target.exists():
                target.mkdir()
                os.chown(target, st.st_uid, st.st_gid)
                os.chmod(target, st.st_mode & 0o7777)
            continue
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()  # may be a hard link into the module cache: never write through
        if path.is_symlink():
            os.symlink(os.readlink(path), target)
            os.lchown(target, st.st_uid, st.st_gid)
        else:
            shutil.copyfile(path, target)
            os.chown(target, st.st_uid, st.st_gid)
            os.chmod(target, st.st_mode & 0o7777)  # after chown, which clears setuid


def apply_overlays(overlays: Path, image: str, root: Path) -> None:
    for layer in layers(overlays, image):
        remove_paths(root, removals(layer))
        if (layer / "copy").is_dir():
            copy_tree(layer / "copy", root)
