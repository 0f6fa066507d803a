"""Compressor benchmark (issue 13, goal 4): time and size of the squashfs image for gzip, xz, lz4
and zstd at several levels, on one large staged tree, with the project's own mksquashfs command
(squashfs.mksquashfs_command: block size, epoch, processors). Prints figures, asserts nothing.

The tree is the staged image of bench_pipeline.bulk_site (core + a module made of
/usr/share, >= 600 MB), or any tree given with --tree (e.g. an existing stage directory).
Each configuration takes seconds to minutes on 2 cores; the whole table takes about 15 minutes.

Run: .venv/bin/python bench/bench_compressors.py [--tree DIR] [--runs 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_pipeline import bulk_site, timed, tree_size  # noqa: E402

from qlimage.image import squashfs  # noqa: E402
from qlimage.layout import Layout  # noqa: E402
from qlimage.site import load_site  # noqa: E402

# (compressor, level as the site spells it: squashfs.level in site.toml; None = the default)
CONFIGS: list[tuple[str, int | None]] = [
    ("zstd", 1),
    ("zstd", 3),
    ("zstd", 9),
    ("zstd", 15),
    ("zstd", 19),
    ("gzip", 6),
    ("gzip", 9),
    ("lz4", None),
    ("lz4", 9),  # -Xhc
    ("xz", None),
]


def measure(tree: Path, out: Path, compressor: str, level: int | None, runs: int) -> float:
    cmd = squashfs.mksquashfs_command(
        tree, out, compressor=compressor, level=level, block_size=131072, epoch=1700000000
    )
    return min(timed(cmd) for _ in range(runs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", type=Path, default=None, help="tree to pack (default: bench site)")
    ap.add_argument("--bulk", type=Path, default=Path("/usr/share"))
    ap.add_argument("--runs", type=int, default=1, help="best of N per configuration")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qlimage-bench.") as name:
        tmp = Path(name)
        tree = args.tree
        if tree is None:
            tree = Layout(load_site(bulk_site(tmp, args.bulk))).stage("img00")
        size = tree_size(tree)
        print(f"compressors on a {size:.0f} MB tree ({tree}), block 128 KiB,"
              f" {Path('/proc/loadavg').read_text().split()[0]} load at start:")  # fmt: skip
        print(f"  {'compressor':<10} {'level':<8} {'time':>8}  {'image':>9}  {'of tree':>7}")
        for compressor, level in CONFIGS:
            out = tmp / "c.img"
            seconds = measure(tree, out, compressor, level, args.runs)
            image = out.stat().st_size / 1e6
            shown = {None: "default", 9: "9 (-Xhc)"}.get(level, str(level))
            if compressor != "lz4" and level is not None:
                shown = str(level)
            print(
                f"  {compressor:<10} {shown:<8} {seconds:7.1f} s  {image:6.1f} MB"
                f"  {100 * image / size:6.1f} %",
                flush=True,
            )
            out.unlink()
        print(f"  load at end: {Path('/proc/loadavg').read_text().split()[0]}")


if __name__ == "__main__":
    main()
