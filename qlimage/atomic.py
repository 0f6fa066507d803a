"""Write outputs beside their final place and rename them in, so nothing is ever half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Every temporary path starts with this, so a build killed at any point leaves only things the
# next build recognises and removes (publish.remove_stale).
TMP_PREFIX = ".qlimage-tmp."


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
        os.replace(work, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(target: Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_path(target) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)  # independent of the umask


def write_text(target: Path, text: str, mode: int = 0o644) -> None:
    write_bytes(target, text.encode(), mode)


def symlink(target: Path, points_to: str) -> None:
    """Create or replace the symlink `target` -> `points_to` atomically."""
    with atomic_path(target) as tmp:
        os.symlink(points_to, tmp)
