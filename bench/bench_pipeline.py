"""Pipeline benchmark (issue: image pipeline in depth). Prints figures and ratios, asserts nothing.

  1. full build vs incremental build after one overlay edit, site with several images
  2. no-op build with 10 images and 1 000 nodes (goal <= 0.3 s)
  3. image step (stage + squashfs) with unchanged, already-unpacked modules / raw mksquashfs of
     the same final tree with the same compressor (goal <= 1.5)
  4. compressors compared on the largest staged tree: time and size

Run: .venv/bin/python bench/bench_pipeline.py [--images 10] [--nodes 1000]
"""

from __future__ import annotations

import argparse
import ipaddress
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qlimage import squashfs  # noqa: E402
from qlimage.site import load_site  # noqa: E402
from qlimage.tasks import Layout  # noqa: E402


def write_site(root: Path, images: int, nodes: int) -> None:
    root.mkdir()
    shutil.copytree(REPO / "modules/core", root / "modules/core")
    (root / "site.toml").write_text(
        '[site]\nsource_date_epoch = 1700000000\n[head]\naddress = "10.0.0.1"\nhttp_port = 8471\n'
        '[networks.boot]\ncidr = "10.0.0.0/16"\nboot = true\ngateway = "10.0.0.1"\n'
    )
    (root / "images.d").mkdir()
    for i in range(images):
        (root / f"images.d/img{i:02d}.toml").write_text(
            f'name = "img{i:02d}"\nflavor = "bookworm"\nversion = "11"\nmodules = ["core"]\n'
        )
        overlay = root / f"overlays/img{i:02d}/copy/etc/qlustar-image-name"
        overlay.parent.mkdir(parents=True)
        overlay.write_text(f"img{i:02d}\n")
    (root / "overlays/common/copy/etc").mkdir(parents=True)
    (root / "overlays/common/copy/etc/motd").write_text("benchmark\n")
    (root / "nodes.d").mkdir()
    base = int(ipaddress.IPv4Address("10.0.1.0"))
    hosts = [
        f'[[hosts]]\nname = "n{n:04d}"\nmac = "52:54:01:00:{n >> 8:02x}:{n & 255:02x}"\n'
        f'image = "img{n % images:02d}"\nnetworks.boot = "{ipaddress.IPv4Address(base + n)}"\n'
        for n in range(nodes)
    ]
    (root / "nodes.d/cluster.toml").write_text("\n".join(hosts))


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--nodes", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qlimage-bench.") as tmp:
        root = Path(tmp) / "site"
        write_site(root, args.images, args.nodes)
        build = [sys.executable, "-m", "qlimage", "-C", str(root), "build"]
        full = timed(build)
        noop = min(timed(build) for _ in range(5))
        (root / "overlays/common/copy/etc/motd").write_text("benchmark, edited\n")
        incr_common = timed(build)
        (root / "overlays/img00/copy/etc/qlustar-image-name").write_text("img00 edited\n")
        incr_one = timed(build)

        site = load_site(root)
        layout = Layout(site)
        tree = layout.stage("img00")
        # Image step with modules already unpacked: force stage+squashfs of one image.
        forced = [*build, "-a", "stage:img00", "squashfs:img00"]
        image_step = min(timed(forced) for _ in range(3))
        raw_cmd = squashfs.mksquashfs_command(
            tree,
            Path(tmp) / "raw.img",
            compressor=site.squashfs_compressor,
            level=site.squashfs_level,
            block_size=site.squashfs_block_size,
            epoch=site.source_date_epoch,
        )
        raw = min(timed(raw_cmd) for _ in range(3))
        tree_mb = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file()) / 1e6

        print(f"site: {args.images} images, {args.nodes} nodes, staged tree {tree_mb:.1f} MB")
        print(f"full build (downloads cached):          {full:8.2f} s")
        print(
            f"incremental, common overlay edit:       {incr_common:8.2f} s"
            f"   ({incr_common / full:.2f} of full)"
        )
        print(
            f"incremental, one image's overlay edit:  {incr_one:8.2f} s"
            f"   ({incr_one / full:.2f} of full)"
        )
        print(f"no-op build:                            {noop:8.3f} s   (goal <= 0.3 s)")
        print(f"image step, modules unpacked (process): {image_step:8.2f} s")
        print(f"raw mksquashfs of the same tree:        {raw:8.2f} s")
        print(f"ratio image step / raw mksquashfs:      {image_step / raw:8.2f}   (goal <= 1.5)")
        print("compressors on the same staged tree:")
        for comp, level in (("gzip", None), ("xz", None), ("zstd", 3), ("zstd", 15), ("lz4", None)):
            out = Path(tmp) / f"c-{comp}-{level}.img"
            cmd = squashfs.mksquashfs_command(
                tree, out, compressor=comp, level=level, block_size=131072, epoch=0
            )
            t = timed(cmd)
            size = out.stat().st_size / 1e6
            print(
                f"  {comp:<4} level {level or 'default':<7} {t:6.2f} s  {size:7.2f} MB"
                f"  {100 * size / tree_mb:5.1f} %"
            )


if __name__ == "__main__":
    main()
