"""Reproducible squashfs images with mksquashfs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from qlimage.atomic import atomic_path
from qlimage.image import stage
from qlimage.progress import Progress, SquashfsBar
from qlimage.run import run

if TYPE_CHECKING:
    from qlimage.site import Site


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
            on_stdout=SquashfsBar(shown).feed,
            # mksquashfs refuses SOURCE_DATE_EPOCH together with -mkfs-time/-all-time, which
            # already carry the site's epoch.
            unset=["SOURCE_DATE_EPOCH"],
        )
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
