"""Build benchmark: prints figures and ratios (never asserts on time).

  full build      demo site from an empty bootfiles/ (downloads already cached)
  no-op build     a second `qlimage build` that has nothing to do
  squashfs ratio  our squashfs step ÷ raw mksquashfs of the same staged tree, same options

Run: .venv/bin/python bench/bench_build.py [--site DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qlimage.image import squashfs  # noqa: E402
from qlimage.layout import Layout  # noqa: E402
from qlimage.site import load_site  # noqa: E402


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def best_of(n: int, fn) -> float:  # type: ignore[no-untyped-def]
    return min(fn() for _ in range(n))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--site", type=Path, default=None, help="site to copy (default: the demo)")
    args = ap.parse_args()
    src = args.site or REPO
    with tempfile.TemporaryDirectory(prefix="qlimage-bench.") as tmp:
        site_dir = Path(tmp) / "site"
        site_dir.mkdir()
        for name in ("site.toml", "images.d", "nodes.d", "modules", "overlays", "rootfs"):
            if (src / name).is_dir():
                shutil.copytree(src / name, site_dir / name, ignore=shutil.ignore_patterns("pool"))
            elif (src / name).exists():
                shutil.copy(src / name, site_dir / name)
        qlimage = [sys.executable, "-m", "qlimage", "-C", str(site_dir), "build"]

        full = timed(qlimage, REPO)
        noop = best_of(5, lambda: timed(qlimage, REPO))

        site = load_site(site_dir)
        layout = Layout(site)
        image = next(iter(site.images))
        tree = layout.stage(image)
        out = Path(tmp) / "raw.img"

        def ours() -> float:
            start = time.perf_counter()
            squashfs.make_squashfs(
                tree, Path(tmp) / "ours.img", compressor=site.squashfs_compressor,
                level=site.squashfs_level, block_size=site.squashfs_block_size,
                epoch=site.source_date_epoch,
            )  # fmt: skip
            return time.perf_counter() - start

        raw_cmd = squashfs.mksquashfs_command(
            tree, out, compressor=site.squashfs_compressor, level=site.squashfs_level,
            block_size=site.squashfs_block_size, epoch=site.source_date_epoch,
        )  # fmt: skip
        ours_t = best_of(5, ours)
        raw_t = best_of(5, lambda: timed(raw_cmd, REPO))
        size = layout.image(image).stat().st_size

    print(f"full build (cached downloads): {full:8.2f} s")
    print(f"no-op build:                   {noop:8.3f} s")
    print(f"squashfs step ({image}, {size / 1e6:.1f} MB):  {ours_t:8.3f} s")
    print(f"raw mksquashfs, same options:  {raw_t:8.3f} s")
    print(f"ratio squashfs step / raw:     {ours_t / raw_t:8.2f}")


if __name__ == "__main__":
    main()
