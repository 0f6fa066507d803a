"""Pipeline benchmark (issue: image pipeline in depth). Prints figures and ratios, asserts nothing.

  1. full build vs incremental build after one overlay edit, site with several images
  2. no-op build with 10 images and 1 000 nodes (goal <= 0.3 s)
  3. image step (stage + squashfs) with unchanged, already-unpacked modules / raw mksquashfs of
     the same final tree with the same compressor (goal <= 1.1; the parts of the step:
     bench/bench_image_step.py)
  4. compressors compared on the largest staged tree: time and size (the full table of levels:
     bench/bench_compressors.py)

Run: .venv/bin/python bench/bench_pipeline.py [--images 10] [--nodes 1000]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import stat
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


# Interpreters that may not write .pyc files pay for compiling qlimage on every start; a head
# node's installed package has them, so the benchmark measures with them.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=ENV)
    return time.perf_counter() - start


def tree_size(tree: Path) -> float:
    total = 0
    for dirpath, _, files in os.walk(tree):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total / 1e6


def bulk_module(pool: Path, source: Path) -> None:
    """A large module made of a host directory (uncompressed .deb: only its tree matters)."""
    root = pool.parent / "bulk-root"
    target = root / source.relative_to("/")
    target.parent.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN/control").write_text(
        "Package: qlustar-module-bulk-bookworm\nVersion: 11.0.0\nArchitecture: amd64\n"
        "Maintainer: bench <bench@example.org>\nDescription: bulk benchmark module\n"
    )
    out = pool / "qlustar-module-bulk-bookworm_11.0.0_amd64.deb"
    subprocess.run(
        ["dpkg-deb", "-Znone", "--build", str(root), str(out)], check=True, capture_output=True
    )
    shutil.rmtree(root)


def bulk_site(tmp: Path, bulk: Path) -> Path:
    """One image of core and a module made of the host directory `bulk`, built once (downloads,
    unpacks, the first generation): the site of the image-step benchmarks."""
    root = tmp / "bulk-site"
    write_site(root, 1, 1)
    pool = root / "modules/pool"
    pool.mkdir(parents=True)
    bulk_module(pool, bulk)
    text = (root / "images.d/img00.toml").read_text().replace('["core"]', '["core", "bulk"]')
    (root / "images.d/img00.toml").write_text(text)
    timed([sys.executable, "-m", "qlimage", "-C", str(root), "build"])
    return root


def image_step(tmp: Path, bulk: Path) -> None:
    """Stage + squashfs of an image whose modules are already unpacked, vs raw mksquashfs."""
    root = bulk_site(tmp, bulk)
    build = [sys.executable, "-m", "qlimage", "-C", str(root), "build"]
    site = load_site(root)
    tree = Layout(site).stage("img00")
    # `build -a stage:img00 squashfs:img00` would also rebuild the module recipe the stage
    # depends on: doit forgets the image step instead, and the build runs just that.
    forget = [sys.executable, "-m", "qlimage", "-C", str(root), "doit", "forget"]

    def image_step_build() -> float:
        subprocess.run([*forget, "stage:img00", "squashfs:img00"], check=True, capture_output=True)
        return timed(build)

    raw_cmd = squashfs.mksquashfs_command(
        tree,
        tmp / "raw.img",
        compressor=site.squashfs_compressor,
        level=site.squashfs_level,
        block_size=site.squashfs_block_size,
        epoch=site.source_date_epoch,
    )

    def raw_run() -> float:
        (tmp / "raw.img").unlink(missing_ok=True)  # outside the clock, as the build's old image
        return timed(raw_cmd)

    # Interleaved, in alternating order, as many runs each: load and writeback hit both alike.
    builds, raws = [], []
    for n in range(3):
        if n % 2:
            raws.append(raw_run())
        builds.append(image_step_build())
        if not n % 2:
            raws.append(raw_run())
    ours, raw = min(builds), min(raws)
    print(f"image step on a {tree_size(tree):.0f} MB tree ({bulk} + core), modules unpacked,")
    print(f"  compressor {site.squashfs_compressor} level {site.squashfs_level or 'default'}:")
    print(f"  qlimage build -a stage squashfs:     {ours:8.2f} s")
    print(f"  raw mksquashfs, same tree/options:   {raw:8.2f} s")
    print(f"  ratio:                               {ours / raw:8.2f}   (goal <= 1.1)")
    print("compressors on the same staged tree:")
    size_mb = tree_size(tree)
    for comp, level in (("gzip", None), ("xz", None), ("zstd", 3), ("zstd", 15), ("lz4", None)):
        out = tmp / f"c-{comp}-{level}.img"
        cmd = squashfs.mksquashfs_command(
            tree, out, compressor=comp, level=level, block_size=131072, epoch=0
        )
        t = timed(cmd)
        size = out.stat().st_size / 1e6
        print(
            f"  {comp:<4} level {level or 'default':<7} {t:6.2f} s  {size:7.1f} MB"
            f"  {100 * size / size_mb:5.1f} %"
        )
        out.unlink()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument(
        "--bulk",
        type=Path,
        default=Path("/usr/share"),
        help="host directory that makes the large module of the image-step ratio",
    )
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

        print(f"site: {args.images} images, {args.nodes} nodes")
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
        image_step(Path(tmp), args.bulk)


if __name__ == "__main__":
    main()
