"""Writing the bundle's files, directories and symlinks atomically."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from .bundle import Entry, ancestors
from .report import Reporter


@dataclass(frozen=True)
class PendingDir:
    path: str
    mode: int
    uid: int
    gid: int


def resolve_uid(name: str | None, fallback: int, path: str, reporter: Reporter) -> int:
    """The node's uid for `name`; looked up at write time because the bundle itself may
    have just written /etc/passwd."""
    if name is None:
        return fallback
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        reporter.detail(f"user {name!r} unknown on node, using uid {fallback} for {path}")
        return fallback


def resolve_gid(name: str | None, fallback: int, path: str, reporter: Reporter) -> int:
    if name is None:
        return fallback
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        reporter.detail(f"group {name!r} unknown on node, using gid {fallback} for {path}")
        return fallback


def resolve_ids(entry: Entry, reporter: Reporter) -> tuple[int, int]:
    return (
        resolve_uid(entry.owner, entry.uid, entry.path, reporter),
        resolve_gid(entry.group, entry.gid, entry.path, reporter),
    )


def temp_name(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{secrets.token_hex(6)}.qlustar-tmp")


def write_file(path: str, data: bytes, mode: int, uid: int, gid: int) -> None:
    """Replace `path` atomically: readers see the old or the new file, never a part."""
    directory, name = os.path.split(path)
    # mkstemp creates the file 0600, so the content is never readable with a wrong mode.
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".qlustar-tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            set_owner_and_mode(f.fileno(), uid, gid, mode)
        os.replace(tmp, path)  # a rename never follows a symlink at `path`
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def set_owner_and_mode(fd: int, uid: int, gid: int, mode: int) -> None:
    # Through the open descriptor, so both surely hit the object we created, whatever
    # happens to its name.  chown first: it clears setuid/setgid on regular files.
    os.chown(fd, uid, gid)
    os.chmod(fd, mode)


def replace_symlink(path: str, target: str, uid: int, gid: int) -> None:
    tmp = temp_name(path)
    os.symlink(target, tmp)
    try:
        os.chown(tmp, uid, gid, follow_symlinks=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def create_parents(path: str, pending: list[PendingDir], reporter: Reporter) -> None:
    """Create missing parent directories; they become 0755 root:root once filled."""
    missing = [p for p in ancestors(path) if not os.path.lexists(p)]
    for parent in reversed(missing):
        os.mkdir(parent, 0o700)
        pending.append(PendingDir(parent, 0o755, 0, 0))
        reporter.detail(f"created parent directory {parent}")


def apply_entry(entry: Entry, pending: list[PendingDir], reporter: Reporter) -> None:
    create_parents(entry.path, pending, reporter)
    uid, gid = resolve_ids(entry, reporter)
    if entry.type == "dir":
        assert entry.mode is not None
        if not os.path.isdir(entry.path):
            # Owner-only until finalized, so nothing is exposed while it is being filled.
            os.mkdir(entry.path, 0o700)
        pending.append(PendingDir(entry.path, entry.mode, uid, gid))
        reporter.detail(f"directory {entry.path} ({entry.mode:04o} {uid}:{gid})")
    elif entry.type == "file":
        assert entry.data is not None and entry.mode is not None
        write_file(entry.path, entry.data, entry.mode, uid, gid)
        reporter.detail(
            f"wrote {entry.path} ({len(entry.data)} bytes, {entry.mode:04o} {uid}:{gid})"
        )
    else:
        assert entry.target is not None
        replace_symlink(entry.path, entry.target, uid, gid)
        reporter.detail(f"linked {entry.path} -> {entry.target}")


def finalize_dirs(pending: Sequence[PendingDir]) -> None:
    """Set directory owners and modes last, deepest first (like tar): a directory that
    becomes e.g. 0500 or root-only must not stop us from writing its contents."""
    first_error: OSError | None = None
    for d in reversed(pending):
        try:
            fd = os.open(d.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                set_owner_and_mode(fd, d.uid, d.gid, d.mode)
            finally:
                os.close(fd)
        except OSError as e:
            first_error = first_error or e
    if first_error is not None:
        raise first_error


def apply_files(entries: Sequence[Entry], reporter: Reporter) -> None:
    """Write all entries in bundle order; raises OSError on the first failure."""
    pending: list[PendingDir] = []
    try:
        for entry in entries:
            try:
                apply_entry(entry, pending, reporter)
            except OSError as e:
                raise OSError(e.errno, f"{entry.path}: {e.strerror or e}") from e
    finally:
        # Even after a failure, leave no directory with its temporary 0700 mode.
        finalize_dirs(pending)
