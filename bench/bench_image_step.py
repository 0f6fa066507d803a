"""Image-step benchmark (issue 13, goal 3): the image step against raw mksquashfs of the same
final tree with the same options. Prints figures and ratios, asserts nothing.

The bench site of bench_pipeline.py with one image of `core` plus a large module made of a host
directory (default /usr/share, >= 600 MB). After a first build (downloads, unpack, first
generation) it times, best of --runs, back to back so load hits both sides alike:

  stage      stage.stage_image: module trees linked from the unpacked cache, overlays, our files
  manifest   stage.write_manifest: the stage as doit sees it
  squashfs   generations.build_image: mksquashfs with progress, sha256, modules.json, state/
  raw        mksquashfs_command on the same staged tree: what the image step cannot beat
  build      `qlimage doit forget stage:img00 squashfs:img00` then `qlimage build`: the
             step as a user pays it, interpreter start, site load, graph and publishing
             included (`build -a` would also rebuild the module recipe the stage depends on)

and, for comparison, staging by copy (`cp -a` of the module trees, what linking replaced).

Run: .venv/bin/python bench/bench_image_step.py [--bulk DIR] [--runs 3] [--site BUILT_BENCH_SITE]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_pipeline import bulk_site, timed, tree_size  # noqa: E402

from qlimage import progress  # noqa: E402
from qlimage.image import generations, squashfs, stage  # noqa: E402
from qlimage.image.publish import current  # noqa: E402
from qlimage.layout import Layout  # noqa: E402
from qlimage.pool.packages import ModulePackage  # noqa: E402
from qlimage.run import run  # noqa: E402
from qlimage.site import Site, load_site  # noqa: E402
from qlimage.tasks.graph import plan  # noqa: E402


def cpu_seconds() -> float:
    """User + system time of this process (all threads) and of its waited-for children."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def clock(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, CPU) seconds of `fn()`. CPU time hardly moves with the load of a shared machine
    (other jobs take turns on the cores, they do not make ours run longer), wall time does."""
    start, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - start, cpu_seconds() - cpu


def rebuild(forget: list[str], build: list[str]) -> tuple[float, float]:
    """The build's times after doit forgot the image step (the forget itself not counted)."""
    timed(forget)
    return clock(lambda: timed(build))


def stage_by_copy(site: Site, modules: list[ModulePackage], dest: Path) -> None:
    """The module trees copied, not linked: what staging cost before the cache was linked."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    for m in modules:
        run(["cp", "-a", "--remove-destination", f"{stage.unpack_module(site, m)}/.", dest])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bulk", type=Path, default=Path("/usr/share"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--site", type=Path, default=None, help="a bench site built before")
    args = ap.parse_args()
    progress.silence()
    with tempfile.TemporaryDirectory(prefix="qlimage-bench.") as name:
        tmp = Path(name)
        root = args.site or bulk_site(tmp, args.bulk)
        site = load_site(root)
        layout = Layout(site)
        image = site.images["img00"]
        modules = plan(site).modules["img00"]
        resolved = stage.resolved_modules_json(image, modules)
        tree = layout.stage("img00")
        previous = current(layout.image_root("img00"))
        raw_cmd = squashfs.mksquashfs_command(
            tree, tmp / "raw.img", compressor=site.squashfs_compressor,
            level=site.squashfs_level, block_size=site.squashfs_block_size,
            epoch=site.source_date_epoch,
        )  # fmt: skip
        qlimage = [sys.executable, "-m", "qlimage", "-C", str(root)]
        forget = [*qlimage, "doit", "forget", "stage:img00", "squashfs:img00"]
        build = [*qlimage, "build", "--quiet"]
        gen = tmp / "gen"

        def pack() -> None:
            shutil.rmtree(gen, ignore_errors=True)
            gen.mkdir()
            generations.build_image(site, image, resolved, gen)

        rows: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.runs):
            times = {
                "stage": clock(lambda: stage.stage_image(site, image, modules, tree,
                                                         previous=previous)),
                "manifest": clock(lambda: stage.write_manifest(tree, tmp / "stage.manifest")),
                "squashfs": clock(pack),
                "raw": clock(lambda: timed(raw_cmd)),
                "build": rebuild(forget, build),
                "raw ": clock(lambda: timed(raw_cmd)),
            }  # fmt: skip
            for key, value in times.items():
                rows.setdefault(key, []).append(value)
        copy = min(
            clock(lambda: stage_by_copy(site, modules, tmp / "copy-stage"))[0]
            for _ in range(args.runs)
        )
        best = {key: min(v[0] for v in values) for key, values in rows.items()}
        cpu = {key: min(v[1] for v in values) for key, values in rows.items()}
        raw, raw_cpu = min(best["raw"], best["raw "]), min(cpu["raw"], cpu["raw "])
        step = best["stage"] + best["manifest"] + best["squashfs"]
        step_cpu = cpu["stage"] + cpu["manifest"] + cpu["squashfs"]
        size = tree_size(tree)

    print(f"image step on a {size:.0f} MB tree ({args.bulk} + core), modules unpacked,")
    load = Path("/proc/loadavg").read_text().split()[0]
    level = site.squashfs_level or "default"
    print(
        f"  compressor {site.squashfs_compressor} level {level}, best of {args.runs}, load {load}:"
    )
    print(f"  {'':<38} {'wall':>8}   {'CPU':>8}")
    for label, key in (
        ("stage (linked from the module cache)", "stage"),
        ("stage manifest", "manifest"),
        ("squashfs (+ sha256, state)", "squashfs"),
    ):
        print(f"  {label + ':':<38} {best[key]:8.2f} s {cpu[key]:8.2f} s")
    print(f"  {'raw mksquashfs, same tree/options:':<38} {raw:8.2f} s {raw_cpu:8.2f} s")
    print(
        f"  {'ratio (stage+manifest+squashfs)/raw:':<38} {step / raw:8.2f}   "
        f"{step_cpu / raw_cpu:8.2f}     (goal <= 1.1)"
    )
    print(
        f"  {'qlimage build, image step forgotten:':<38} {best['build']:8.2f} s"
        f" {cpu['build']:8.2f} s"
    )
    print(f"  {'ratio build/raw:':<38} {best['build'] / raw:8.2f}   {cpu['build'] / raw_cpu:8.2f}")
    print(f"  for comparison, module trees copied:  {copy:8.2f} s instead of {best['stage']:.2f} s")


if __name__ == "__main__":
    main()
