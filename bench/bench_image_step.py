"""Image-step benchmark (issue 13, goal 3): the image step against raw mksquashfs of the same
final tree with the same options. Prints figures and ratios, asserts nothing.

The bench site of bench_pipeline.py with one image of `core` plus a large module made of a host
directory (default /usr/share, >= 600 MB). After a first build (downloads, unpack, first
generation) each run times, back to back and in alternating order (so that load, page cache and
writeback hit both sides alike), best of --runs with as many samples on each side:

  stage      stage.stage_image: module trees linked from the unpacked cache, overlays, our files
  manifest   stage.write_manifest: the stage as doit sees it
  squashfs   generations.build_image, split into
    rm wait    stage.finish_removals in pack_image: the wait for the old stage's deletion
    pack       the rest of squashfs.pack_image: mksquashfs with progress and early writeback
    sha256     the rest: sha256 of the image, modules.json, state/
  fsync      publish.fsync_tree of the generation: what publishing waits for before the rename
  raw        mksquashfs_command on the same staged tree: what the image step cannot beat
  build      `qlimage doit forget stage:img00 squashfs:img00` then `qlimage build`: the
             step as a user pays it, interpreter start, site load, graph and publishing
             included (`build -a` would also rebuild the module recipe the stage depends on);
             paired with a raw run of its own

and, for comparison, staging by copy (`cp -a` of the module trees, what linking replaced).
Outputs of the previous run are deleted before the clock starts, on both sides.

Run: .venv/bin/python bench/bench_image_step.py [--bulk DIR] [--runs 3] [--site BUILT_BENCH_SITE]
"""

from __future__ import annotations

import argparse
import os
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
from qlimage.image.publish import current, fsync_tree  # noqa: E402
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
    """(wall, CPU) seconds of `fn()`. CPU time moves less with the load of a shared machine
    than wall time (other jobs take turns on the cores), but it does move: the same 30-second
    mksquashfs took 61-75 s of CPU at loads 1.5-11 (shared caches, SMT siblings)."""
    start, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - start, cpu_seconds() - cpu


# The tasks a build after `doit forget` of the image step must run, and no other.
IMAGE_STEP_TASKS = {"stage:img00", "squashfs:img00"}


def rebuild(forget: list[str], build: list[str]) -> tuple[tuple[float, float], set[str]]:
    """The build's times after doit forgot the image step (the forget itself not counted),
    and the tasks it ran beyond the image step: in a checkout others edit, a changed initrd
    script or template makes the build redo those too, and the run does not count."""
    timed(forget)
    out: list[bytes] = []
    # With .pyc files, as an installed head's package has them (bench_pipeline.ENV).
    unset = ["PYTHONDONTWRITEBYTECODE"]
    times = clock(lambda: out.append(run(build, capture=True, unset=unset).stdout))
    ran = {line[3:].strip() for line in out[0].decode().splitlines() if line.startswith(". ")}
    return times, ran - IMAGE_STEP_TASKS


def stage_by_copy(site: Site, modules: list[ModulePackage], dest: Path) -> None:
    """The module trees copied, not linked: what staging cost before the cache was linked."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    for m in modules:
        run(["cp", "-a", "--remove-destination", f"{stage.unpack_module(site, m)}/.", dest])


def own_cpu_seconds() -> float:
    """User + system time of this process alone (all threads), children not counted."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


class Timed:
    """Wraps a function and keeps the (wall, CPU) of its last call, and the CPU time this
    process spent in it (the rest is its children's): a part of a step timed from inside it,
    without changing what the step does."""

    def __init__(self, fn: Callable[..., object]) -> None:
        self.fn = fn
        self.last = (0.0, 0.0)
        self.own = 0.0

    def __call__(self, *args: object, **kwargs: object) -> object:
        result: list[object] = []
        own = own_cpu_seconds()
        self.last = clock(lambda: result.append(self.fn(*args, **kwargs)))
        self.own = own_cpu_seconds() - own
        return result[0]


def minus(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return a[0] - b[0], a[1] - b[1]


def plus(*parts: tuple[float, float]) -> tuple[float, float]:
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bulk", type=Path, default=Path("/usr/share"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--site", type=Path, default=None, help="a bench site built before")
    args = ap.parse_args()
    progress.silence()
    # The step's mksquashfs timed from inside build_image (generations calls squashfs.pack_image).
    pack_image = Timed(squashfs.pack_image)
    squashfs.pack_image = pack_image  # type: ignore[assignment]
    # ... and its wait for the old stage's deletion, which runs beside the stage manifest and
    # mksquashfs (a deletion waited for before mksquashfs shows up here as serial time).
    removals = Timed(stage.finish_removals)
    stage.finish_removals = removals  # type: ignore[assignment]
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
        raw_img = tmp / "raw.img"
        raw_cmd = squashfs.mksquashfs_command(
            tree, raw_img, compressor=site.squashfs_compressor,
            level=site.squashfs_level, block_size=site.squashfs_block_size,
            epoch=site.source_date_epoch,
        )  # fmt: skip
        qlimage = [sys.executable, "-m", "qlimage", "-C", str(root)]
        forget = [*qlimage, "doit", "forget", "stage:img00", "squashfs:img00"]
        build = [*qlimage, "build", "--quiet"]
        gen = tmp / "gen"

        def raw() -> dict[str, tuple[float, float]]:
            raw_img.unlink(missing_ok=True)
            return {"raw": clock(lambda: timed(raw_cmd))}

        def step() -> dict[str, tuple[float, float]]:
            shutil.rmtree(gen, ignore_errors=True)
            gen.mkdir()
            parts = {
                "stage": clock(lambda: stage.stage_image(site, image, modules, tree,
                                                         previous=previous)),
                "manifest": clock(lambda: stage.write_manifest(tree, tmp / "stage.manifest")),
                "squashfs": clock(lambda: generations.build_image(site, image, resolved, gen)),
                "fsync": clock(lambda: fsync_tree(gen)),
            }  # fmt: skip
            parts["rm wait"] = removals.last
            parts["pack"] = minus(pack_image.last, removals.last)
            # CPU of qlimage itself beside mksquashfs: progress pipe, writeback, and the old
            # stage's deletion where it runs beside mksquashfs
            parts["beside"] = (0.0, pack_image.own - removals.own)
            parts["sha256"] = minus(parts["squashfs"], pack_image.last)
            parts["step"] = plus(parts["stage"], parts["manifest"], parts["squashfs"],
                                 parts["fsync"])  # fmt: skip
            return parts

        def user_build() -> dict[str, tuple[float, float]]:
            times, extra = rebuild(forget, build)
            if extra:
                print(f"  (this build also ran {', '.join(sorted(extra))}: not counted)")
                return {"build, not counted": times}
            return {"build": times}

        # Whatever is due for other reasons (the checkout's code changed since the site was
        # built: an initrd script, a bundle template) is done now, not in a timed build.
        timed(build)
        started = load()
        rows: list[dict[str, tuple[float, float]]] = []
        for n in range(args.runs):
            # Alternate the order: whichever runs second finds the other's image being written
            # back and the tree's pages warmer.
            pairs = (
                ((step, raw), (user_build, raw)) if n % 2 == 0 else ((raw, step), (raw, user_build))
            )
            for first, second in pairs:
                row = {**first(), **second()}
                rows.append(row)
                shown = {k: f"{v[0]:.2f}/{v[1]:.2f}" for k, v in row.items()}
                print(f"  run {n + 1}, load {load()}, wall/CPU s: {shown}", flush=True)
        copy = min(
            clock(lambda: stage_by_copy(site, modules, tmp / "copy-stage"))[0]
            for _ in range(args.runs)
        )
        size = tree_size(tree)
    report(args, site, size, rows, copy, started)


def report(
    args: argparse.Namespace,
    site: Site,
    size: float,
    rows: list[dict[str, tuple[float, float]]],
    copy: float,
    started: str,
) -> None:
    def best_of(key: str, paired_with: str | None = None) -> tuple[float, float] | None:
        values = [r[key] for r in rows if key in r and (paired_with is None or paired_with in r)]
        return (min(v[0] for v in values), min(v[1] for v in values)) if values else None

    def best(key: str, paired_with: str | None = None) -> tuple[float, float]:
        found = best_of(key, paired_with)
        assert found is not None, key  # the step and its raw runs are always counted
        return found

    raw_s, raw_b = best("raw", "step"), best_of("raw", "build")
    step, build = best("step"), best_of("build")
    ratios = [r["step"][0] / r["raw"][0] for r in rows if "step" in r]
    cpu_ratios = [r["step"][1] / r["raw"][1] for r in rows if "step" in r]
    level = site.squashfs_level or "default"
    print(f"image step on a {size:.0f} MB tree ({args.bulk} + core), modules unpacked,")
    print(
        f"  compressor {site.squashfs_compressor} level {level}, best of {args.runs},"
        f" load {started} at the start, {load()} at the end:"
    )
    raw_argv, step_argv = (
        squashfs.mksquashfs_command(
            Path("tree"), Path("out"), compressor=site.squashfs_compressor,
            level=site.squashfs_level, block_size=site.squashfs_block_size,
            epoch=site.source_date_epoch, progress=bar,
        )
        for bar in (False, True)
    )  # fmt: skip
    print(
        f"  the step's mksquashfs is raw's without {sorted(set(raw_argv) - set(step_argv))},"
        f" with {sorted(set(step_argv) - set(raw_argv))}"
    )
    print(f"  {'':<40} {'wall':>8}   {'CPU':>8}")
    for label, key in (
        ("stage (linked from the module cache)", "stage"),
        ("stage manifest", "manifest"),
        ("squashfs: wait for the old stage's rm", "rm wait"),
        ("squashfs: mksquashfs", "pack"),
        ("  of it in qlimage, beside mksquashfs", "beside"),
        ("squashfs: sha256, modules.json, state", "sha256"),
        ("fsync of the generation", "fsync"),
        ("image step, sum of the best parts", None),
        ("image step, best run", "step"),
    ):
        if key is None:
            parts = [best(k) for k in ("stage", "manifest", "rm wait", "pack", "sha256", "fsync")]
            wall, cpu = plus(*parts)
        else:
            wall, cpu = best(key)
        print(f"  {label + ':':<40} {wall:8.2f} s {cpu:8.2f} s")
    print(f"  {'raw mksquashfs, same tree/options:':<40} {raw_s[0]:8.2f} s {raw_s[1]:8.2f} s")
    print(
        f"  {'ratio step/raw (best of each):':<40} {step[0] / raw_s[0]:8.2f}   "
        f"{step[1] / raw_s[1]:8.2f}     (goal <= 1.1)"
    )
    walls, cpus = (" ".join(f"{r:.2f}" for r in rs) for rs in (ratios, cpu_ratios))
    print(f"  {'ratio step/raw, run by run:':<40} {walls} wall; {cpus} CPU")
    print(
        f"  {'mksquashfs in the step/raw:':<40} {best('pack')[0] / raw_s[0]:8.2f}   "
        f"{best('pack')[1] / raw_s[1]:8.2f}     (the same command: load noise)"
    )
    # What the step adds to mksquashfs, measured part by part (each best of its runs), so
    # that the noise of two 30-second mksquashfs runs on a shared machine cancels out: the
    # serial parts add their wall time, the work beside mksquashfs its CPU time shared over
    # the cores mksquashfs keeps busy.
    serial = plus(*(best(k) for k in ("stage", "manifest", "rm wait", "sha256", "fsync")))
    beside = best("beside")[1]
    cores = os.cpu_count() or 1
    wall = (raw_s[0] + serial[0] + beside / cores) / raw_s[0]
    cpu = (raw_s[1] + serial[1] + beside) / raw_s[1]
    print(
        f"  {'step/raw from the parts:':<40} {wall:8.2f}   {cpu:8.2f}     "
        f"(raw + {serial[0]:.2f} s serial + {beside:.2f} s CPU beside it)"
    )
    if build is None or raw_b is None:
        print("  qlimage build: no run counted (each one also ran other tasks)")
    else:
        label = "qlimage build, image step forgotten:"
        print(f"  {label:<40} {build[0]:8.2f} s {build[1]:8.2f} s")
        print(
            f"  {'ratio build/raw (its own raw runs):':<40} {build[0] / raw_b[0]:8.2f}   "
            f"{build[1] / raw_b[1]:8.2f}"
        )
    print(
        f"  for comparison, module trees copied:  {copy:8.2f} s instead of {best('stage')[0]:.2f} s"
    )


if __name__ == "__main__":
    main()
