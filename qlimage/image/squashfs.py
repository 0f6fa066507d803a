"""Reproducible squashfs images with mksquashfs.

The image is written out to disk while mksquashfs still makes it (`EarlyWriteback`): publishing
makes a generation durable (fsync) before its rename, and without this that fsync found most of
the image still in memory and waited for the disk to write it all at the end of the step.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from qlimage.atomic import atomic_path
from qlimage.image import stage
from qlimage.progress import Progress, SquashfsBar
from qlimage.run import run

if TYPE_CHECKING:
    from qlimage.site import Site

# How often, at most, the kernel is asked to start writing out what mksquashfs wrote so far.
WRITEBACK_EVERY = 1.0
# sync_file_range(2) flag (<linux/fs.h>): start writing the range's dirty pages, do not wait.
SYNC_FILE_RANGE_WRITE = 2


def mksquashfs_command(
    tree: Path,
    output: Path,
    *,
    compressor: str,
    level: int | None,
    block_size: int,
    epoch: int,
    progress: bool = False,
) -> list[str]:
    """The exact mksquashfs call; the bench times this same command raw. With `progress`,
    mksquashfs draws its progress bar on stdout (`-quiet` keeps everything else off)."""
    cmd = [
        "mksquashfs",
        str(tree),
        str(output),
        "-noappend",
        *([] if progress else ["-no-progress"]),
        "-quiet",
        "-comp",
        compressor,
        "-b",
        str(block_size),
        # Reproducibility: the superblock time and every inode time are the epoch, whatever the
        # tree says; mksquashfs sorts directories itself and is deterministic across threads.
        "-mkfs-time",
        str(epoch),
        "-all-time",
        str(epoch),
        "-processors",
        str(os.cpu_count() or 1),
    ]
    if level is not None and compressor in ("gzip", "xz", "zstd", "lz4", "lzo"):
        if compressor == "zstd" or compressor == "gzip" or compressor == "lzo":
            cmd += ["-Xcompression-level", str(level)]
        elif compressor == "lz4" and level >= 9:
            cmd += ["-Xhc"]
    return cmd


def libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """sync_file_range(2) of the C library (Python's os has no wrapper), or None without one."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = libc_sync_file_range()


def start_writeback(fd: int) -> bool:
    """Have the kernel start writing the file's dirty pages to disk, without waiting for it.
    A hint only, whether it works or not: durability stays with the fsync before the rename."""
    if _sync_file_range is None:
        return False
    return _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) == 0


class EarlyWriteback:
    """Starts the writeback of `path` while mksquashfs writes it, at most every `every`
    seconds (poked from mksquashfs' progress output, whenever some comes).

    The disk is idle while mksquashfs compresses: what it wrote is written out meanwhile, so
    the fsync of the generation waits for the last second's writes only. The pages stay in
    the page cache, so the sha256 right after mksquashfs still reads from memory."""

    def __init__(
        self,
        path: Path,
        every: float = WRITEBACK_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.every = every
        self.clock = clock
        self.last = clock()
        self.fd: int | None = None
        self.started = 0  # how many writebacks were started

    def poke(self) -> None:
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        if self.fd is None:
            try:  # mksquashfs creates the file once it has read the tree
                self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                return
        self.started += start_writeback(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def make_squashfs(
    tree: Path,
    output: Path,
    *,
    compressor: str = "zstd",
    level: int | None = None,
    block_size: int = 131072,
    epoch: int,
) -> None:
    shown = Progress(f"mksquashfs {output.name}", 0)
    with atomic_path(output) as tmp:
        bar, writeback = SquashfsBar(shown), EarlyWriteback(tmp, WRITEBACK_EVERY)

        def on_progress(chunk: bytes) -> None:
            bar.feed(chunk)
            writeback.poke()

        try:
            run(
                mksquashfs_command(
                    tree,
                    tmp,
                    compressor=compressor,
                    level=level,
                    block_size=block_size,
                    epoch=epoch,
                    progress=True,
                ),
                on_stdout=on_progress,
                # mksquashfs refuses SOURCE_DATE_EPOCH together with -mkfs-time/-all-time,
                # which already carry the site's epoch.
                unset=["SOURCE_DATE_EPOCH"],
            )
        finally:
            writeback.close()
        shown.finish()
        os.chmod(tmp, 0o644)


def pack_image(site: Site, tree: Path, output: Path) -> None:
    """The one way an image is packed: the site's compressor, level, block size and epoch
    (a build from inputs and a hand edit's repack give the same bytes for the same tree)."""
    make_squashfs(
        tree,
        output,
        compressor=site.squashfs_compressor,
        level=site.squashfs_level,
        block_size=site.squashfs_block_size,
        epoch=site.source_date_epoch,
    )
    # The previous stage was being deleted beside mksquashfs (stage.set_aside): done by now
    # as a rule, and waited for here so that it ends within the build lock.
    stage.finish_removals()
