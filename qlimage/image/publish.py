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
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from qlimage.atomic import TMP_PREFIX, clamp_output_tree, symlink, write_text
from qlimage.contract import (
    CHECKSUM_SUFFIX,
    CURRENT,
    GENERATION,
    HISTORY,
    IMAGES_DIR,
    checksum_name,
)
from qlimage.errors import QlimageError
from qlimage.layout import Layout
from qlimage.site import Site
from qlimage.trees import file_digest

# The test hook of `fault_point`: the name of the step at which the process kills itself.
KILL_AT_ENV = "QLIMAGE_TEST_KILL_AT"


def history(root: Path) -> list[str]:
    path = root / HISTORY
    return path.read_text().split() if path.exists() else []


def current(root: Path) -> Path | None:
    link = root / CURRENT
    return link.resolve() if link.is_symlink() and link.exists() else None


def current_name(root: Path) -> str | None:
    link = root / CURRENT
    return os.readlink(link) if link.is_symlink() else None


def fault_point(name: str) -> None:
    """Die here, as a SIGKILL would, when the test hook names this step: the crash tests kill a
    build at exact points instead of guessing them by timing."""
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def naming_files(gen: Path) -> list[Path]:
    """The files whose digests name a generation: its top-level files, except `generation` and
    a file that has its own checksum file beside it (the checksum file names it instead)."""
    files = [p for p in gen.iterdir() if p.is_file() and not p.is_symlink()]
    sums = {p.name for p in files if p.name.endswith(CHECKSUM_SUFFIX)}
    return [p for p in files if p.name != GENERATION and checksum_name(p.name) not in sums]


def content_name(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        h.update(path.name.encode() + b"\0")
        h.update(bytes.fromhex(file_digest(path)))
    return h.hexdigest()[:16]


def is_intact(gen: Path) -> bool:
    """Cheap: the generation names itself and its small files still hash to its name (a half
    deleted or half written directory does not)."""
    try:
        if gen.is_symlink() or (gen / GENERATION).read_text() != gen.name + "\n":
            return False
        return content_name(naming_files(gen)) == gen.name
    except OSError:
        return False


def is_verified(gen: Path) -> bool:
    """Intact, and every `<file>.sha256` matches its file (the image itself is hashed)."""
    if not is_intact(gen):
        return False
    try:
        for sums in gen.glob("*" + CHECKSUM_SUFFIX):
            words = sums.read_text().split()
            target = gen / sums.name[: -len(CHECKSUM_SUFFIX)]
            if not words or target.is_symlink() or file_digest(target) != words[0]:
                return False
    except (OSError, UnicodeDecodeError):
        return False
    return True


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


def publish(
    root: Path,
    build: Callable[[Path], list[Path]],
    keep: int,
    accept: Callable[[Path], None] | None = None,
) -> str:
    """Build a generation with `build(tmpdir)` (returns the files that name it), move it into
    place, make it current and prune to the last `keep` generations. Returns its name.

    `accept(generation directory)` runs once the generation is in place, before it becomes
    current, for a generation that is not current yet (the boot test): if it raises, the
    generation is removed again and the current one stays.

    Crash-safe at every step: the generation is in `history` before its rename (a kill right
    after the rename cannot leak it), and `remove_stale` reconciles history with directories."""
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}generation.", dir=root))
    try:
        os.chmod(work, 0o755)
        name = content_name(build(work))
        write_text(work / GENERATION, name + "\n")
        clamp_output_tree(work)  # mtimes of served files: the site's source_date_epoch
        fsync_tree(work)
        if not is_intact(root / name):
            record(root, name)
            fault_point("generation-recorded")
            discard(root / name)  # a broken leftover of the same name
            os.rename(work, root / name)
            fault_point("generation-renamed")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if accept is not None and name != current_name(root):
        try:
            accept(root / name)
        except BaseException:
            write_history(root, [g for g in history(root) if g != name])
            discard(root / name)
            raise
    make_current(root, name)
    fault_point("current-switched")
    prune(root, keep)
    return name


def record(root: Path, name: str) -> None:
    if name not in history(root):
        write_history(root, [*history(root), name])


def write_history(root: Path, entries: list[str]) -> None:
    write_text(root / HISTORY, "".join(f"{g}\n" for g in entries))


def make_current(root: Path, name: str) -> None:
    symlink(root / CURRENT, name)
    entries = [g for g in history(root) if g != name] + [name]
    if entries != history(root):
        write_history(root, entries)


def discard(path: Path, point: str = "discard-renamed") -> None:
    """Delete a directory so that no kill leaves it half deleted under its own name: rename it
    to a temporary (which `remove_stale` deletes after a kill), then delete that."""
    if not (path.exists() or path.is_symlink()):
        return
    tmp = path.with_name(f"{TMP_PREFIX}discard.{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.rename(path, tmp)
    fault_point(point)
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def prune(root: Path, keep: int) -> None:
    """Drop all but the last `keep` generations: first from `history` (rollback can then no
    longer pick one), then each directory by `discard`."""
    entries = history(root)
    cur = current_name(root)
    drop = [g for g in entries[: max(0, len(entries) - keep)] if g != cur]
    if not drop:
        return
    write_history(root, [g for g in entries if g not in drop])
    fault_point("prune-unlisted")
    for g in drop:
        discard(root / g, "prune-renamed")


def rollback(root: Path) -> str:
    """Make the newest verified generation before the current one current again; drop the
    current one and any broken one in between (a node would refuse those)."""
    entries = history(root)
    cur = current_name(root)
    before = entries[: entries.index(cur)] if cur in entries else []
    good = [g for g in before if is_verified(root / g)]
    if cur is None or not good:
        known = ", ".join(entries) or "empty"
        raise QlimageError(
            f"{root}: no previous generation to roll back to that verifies (history: {known})"
        )
    previous = good[-1]
    symlink(root / CURRENT, previous)
    write_history(root, good)
    for g in sorted(set(entries) - set(good)):
        discard(root / g)
    return previous


def reconcile(root: Path) -> None:
    """After a killed build: `history` lists exactly the intact generation directories (and
    the current one); every other directory is deleted."""
    if not root.is_dir():
        return
    cur = current_name(root)
    dirs = {
        p.name
        for p in root.iterdir()
        if p.is_dir() and not p.is_symlink() and not p.name.startswith(TMP_PREFIX)
    }
    kept = [g for g in history(root) if g in dirs and is_intact(root / g)]
    if cur in dirs and cur not in kept:
        kept.append(cur)  # never delete what nodes are served
    for g in sorted(dirs - set(kept)):
        discard(root / g)
    if kept != history(root):
        write_history(root, kept)


def reconcile_nodes(layout: Layout) -> None:
    """Keep only the node generations (`nodes/.<mac>.<digest>`) a `nodes/<mac>` link serves."""
    nodes = layout.nodes()
    if not nodes.is_dir():
        return
    served = {os.readlink(p) for p in nodes.iterdir() if p.is_symlink()}
    for entry in sorted(nodes.iterdir()):
        hidden = entry.name.startswith(".") and not entry.name.startswith(TMP_PREFIX)
        if hidden and entry.name not in served:
            discard(entry)


def prune_images(layout: Layout, images: list[str]) -> None:
    """Remove every image that left images.d: its generations carry its root password hash
    and would stay fetchable. `current` goes first, so no boot finds a half deleted one."""
    root = layout.qlustar / IMAGES_DIR
    if not root.is_dir():
        return
    for entry in sorted(root.iterdir()):
        if entry.name in images or entry.name.startswith(TMP_PREFIX):
            continue
        (entry / CURRENT).unlink(missing_ok=True)
        fault_point("image-unlinked")
        discard(entry)


def generation_roots(layout: Layout) -> list[Path]:
    images = layout.qlustar / IMAGES_DIR
    roots = [layout.boot]
    if images.is_dir():
        roots += sorted(p for p in images.iterdir() if p.is_dir() and not p.is_symlink())
    return roots


def rollback_image(site: Site, image: str, *, wait: bool = True) -> str:
    """Roll the site's `image` back under the build lock; returns the generation now current."""
    if image not in site.images:
        raise QlimageError(
            f"unknown image {image!r} (images.d has: {', '.join(sorted(site.images)) or 'none'})"
        )
    with build_lock(site.paths.bootfiles, wait=wait):
        return rollback(Layout(site).image_root(image))


def remove_stale(root: Path) -> list[Path]:
    """Delete what killed builds left behind: every temporary directory of atomic_path, every
    generation that is not in its history, and node generations that no link serves."""
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
    for gen_root in generation_roots(layout):
        reconcile(gen_root)
    reconcile_nodes(layout)
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
