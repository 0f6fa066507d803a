"""`qlimage repro-check`: build the site twice from scratch and compare every output byte for byte.

Two copies of the site's inputs are built in two temporary directories, each by its own
`qlimage build` process, under conditions that must not matter:

| | a | b |
| --- | --- | --- |
| build directory | `<tmp>/a/<site>` | `<tmp>/b/<site>` (same base name: it may name the site) |
| input copy order | sorted | reversed (directory entries are created in the other order) |
| umask of the build | 022 | 077 |
| TZ | UTC | Pacific/Auckland |
| PYTHONHASHSEED | 1 | 2 (set and dict iteration orders differ) |
| clock | now | later (and a day behind, through faketime, when it is installed) |

What stays the same is what a site's outputs may depend on: its input files (copied with their
modes, owners and mtimes), SOURCE_DATE_EPOCH (the site's: both copies have its site.toml and the
same environment), the download cache (shared), the host's tools and qlimage's own code (a
warning says when that changed during the check).

Outputs are the published trees `tftpboot/`, `pxelinux.cfg/` and `qlustar/` under `bootfiles/`
(file content, modes, owners, link text, directory modes; not mtimes) and the .debs the site's
recipes build. A `current` link is compared as link text and the generation it points at is
walked under the link's name, so both builds' images are compared as `.../current/<image>.img`
even when their generation names (content hashes) differ.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlimage.atomic import TMP_PREFIX
from qlimage.errors import CommandTimeout, QlimageError
from qlimage.run import STDOUT, run
from qlimage.site import Site, load_site
from qlimage.trees import file_digest

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    SubParsers = Any

Out = Callable[[str], None]

# Never site inputs: version control, virtual environments, tool caches.
SKIP_NAMES = frozenset(
    {".git", ".venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
)
DIFFOSCOPE_TIMEOUT = 120.0  # seconds per file
DIFFOSCOPE_LINES = 60
DIFFOSCOPE_MAX_FILES = 10
LOG_TAIL = 25
# A POSIX TZ rule for when tzdata is missing (glibc would silently fall back to UTC).
AUCKLAND_RULE = "NZST-12NZDT,M9.5.0,M4.1.0/3"
FAKETIME_OFFSET = "-1d"  # behind, so b never finds the shared index cache stale when a did not


@dataclass(frozen=True)
class Variant:
    """The conditions one of the two builds runs under."""

    name: str
    umask: int
    tz: str
    reverse: bool  # copy the inputs in reverse order
    hash_seed: str
    faketime: bool  # run under faketime FAKETIME_OFFSET when faketime is installed

    def describe(self, faked: bool) -> str:
        parts = [
            f"umask {self.umask:04o}",
            f"TZ={self.tz}",
            f"PYTHONHASHSEED={self.hash_seed}",
            "inputs copied in reverse order" if self.reverse else "inputs copied in order",
        ]
        if faked:
            parts.append(f"faketime {FAKETIME_OFFSET}")
        return ", ".join(parts)


VARIANTS = (
    Variant("a", 0o022, "UTC", reverse=False, hash_seed="1", faketime=False),
    Variant("b", 0o077, "Pacific/Auckland", reverse=True, hash_seed="2", faketime=True),
)


# --- comparing two trees ----------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One path of an output tree, as far as a comparison cares."""

    kind: str  # "file", "symlink", "dir" or "other"
    mode: int  # permission bits (with setuid/setgid/sticky)
    owner: tuple[int, int]
    path: Path  # where it is on disk (for a followed generation: below the real directory)
    target: str = ""  # a symlink's text
    digest: str = ""  # a file's sha256
    size: int = 0


@dataclass(frozen=True)
class Difference:
    path: str  # relative label; directories end in "/"
    status: str  # "differs", "only in a" or "only in b"
    details: tuple[str, ...] = ()
    a: Path | None = None
    b: Path | None = None

    @property
    def content(self) -> bool:
        """Both sides are regular files with different bytes (worth a diffoscope)."""
        return any(d.startswith("content") for d in self.details)

    def line(self) -> str:
        more = f" ({'; '.join(self.details)})" if self.details else ""
        return f"{self.status}: {self.path}{more}"


@dataclass
class Comparison:
    same: list[tuple[str, Entry]] = field(default_factory=list)
    differences: list[Difference] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.differences

    @property
    def same_files(self) -> list[tuple[str, Entry]]:
        """Regular files and symlinks (directories are compared by mode but not listed)."""
        return [(p, e) for p, e in self.same if e.kind != "dir"]


def make_entry(path: Path) -> Entry:
    st = path.lstat()
    owner = (st.st_uid, st.st_gid)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        return Entry("symlink", 0, owner, path, target=os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return Entry("dir", mode, owner, path)
    if stat.S_ISREG(st.st_mode):
        return Entry("file", mode, owner, path, digest=file_digest(path), size=st.st_size)
    return Entry("other", mode, owner, path, target=f"{stat.S_IFMT(st.st_mode):o}")


def followed_generations(directory: Path, names: Iterable[str]) -> dict[str, str]:
    """{generation directory: link name} for links (like `current`) to a sibling directory."""
    found: dict[str, str] = {}
    for name in names:
        path = directory / name
        if not path.is_symlink():
            continue
        target = os.readlink(path)
        real = directory / target
        if (
            "/" not in target
            and target not in (".", "..")
            and real.is_dir()
            and not real.is_symlink()
            and target not in found
        ):
            found[target] = name
    return found


def collect(base: Path, rel: str) -> dict[str, Entry]:
    """Every path below `base/rel` (itself included unless rel is ""), keyed by its label:
    the path relative to `base`, directories with a trailing "/"."""
    entries: dict[str, Entry] = {}
    start = base / rel if rel else base
    if not (start.exists() or start.is_symlink()):
        return entries

    def add(path: Path, label: str) -> None:
        entry = make_entry(path)
        if entry.kind != "dir":
            entries[label] = entry
            return
        if label:
            entries[label + "/"] = entry
        walk_dir(path, label)

    def walk_dir(directory: Path, label: str) -> None:
        names = sorted(os.listdir(directory), key=os.fsencode)
        generations = followed_generations(directory, names)
        for name in names:
            if name in generations:
                continue  # walked under the name of the link that publishes it
            child = f"{label}/{name}" if label else name
            add(directory / name, child)
            if name in generations.values():
                target = os.readlink(directory / name)
                entries[child + "/"] = make_entry(directory / target)
                walk_dir(directory / target, child)

    add(start, rel)
    return entries


def compare_entries(a: Entry, b: Entry) -> tuple[str, ...]:
    if a.kind != b.kind:
        return (f"type {a.kind} vs {b.kind}",)
    details: list[str] = []
    if a.kind == "symlink" and a.target != b.target:
        details.append(f"link {a.target} vs {b.target}")
    if a.kind == "file" and a.digest != b.digest:
        details.append(
            f"content: sha256 {a.digest[:16]} vs {b.digest[:16]}, {a.size} vs {b.size} bytes"
        )
    if a.kind == "other" and a.target != b.target:
        details.append(f"file type {a.target} vs {b.target}")
    if a.kind != "symlink" and a.mode != b.mode:
        details.append(f"mode {a.mode:04o} vs {b.mode:04o}")
    if a.owner != b.owner:
        details.append(f"owner {a.owner[0]}:{a.owner[1]} vs {b.owner[0]}:{b.owner[1]}")
    return tuple(details)


def compare_trees(a: Path, b: Path, roots: Iterable[str] = ("",)) -> Comparison:
    """Compare the trees `a/<root>` and `b/<root>` for each root (a directory or a file,
    relative; "" is the whole tree): file content and mode, link text, directory mode, owners.
    Links to a sibling directory (generations) are also followed, see `collect`."""
    entries_a: dict[str, Entry] = {}
    entries_b: dict[str, Entry] = {}
    for root in roots:
        entries_a.update(collect(a, root))
        entries_b.update(collect(b, root))
    result = Comparison()
    for label in sorted(entries_a.keys() | entries_b.keys(), key=os.fsencode):
        ea, eb = entries_a.get(label), entries_b.get(label)
        if eb is None:
            assert ea is not None
            result.differences.append(Difference(label, "only in a", a=ea.path))
        elif ea is None:
            result.differences.append(Difference(label, "only in b", b=eb.path))
        else:
            details = compare_entries(ea, eb)
            if details:
                result.differences.append(Difference(label, "differs", details, ea.path, eb.path))
            else:
                result.same.append((label, ea))
    return result


def run_diffoscope(
    a: Path, b: Path, *, timeout: float = DIFFOSCOPE_TIMEOUT, lines: int = DIFFOSCOPE_LINES
) -> list[str]:
    """The first `lines` lines of `diffoscope --text - a b`, or why there are none."""
    tool = shutil.which("diffoscope")
    if tool is None:
        return ["diffoscope is not installed (apt-get install diffoscope-minimal)"]
    try:
        proc = run([tool, "--text", "-", a, b], capture=True, check=False, timeout=timeout)
    except CommandTimeout:
        return [f"diffoscope timed out after {timeout:.0f} s"]
    text = proc.stdout.decode(errors="replace").splitlines()
    if proc.returncode not in (0, 1) and not text:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        return [f"diffoscope failed (status {proc.returncode}): {err[-1] if err else ''}"]
    if len(text) > lines:
        return [*text[:lines], f"... ({len(text) - lines} more lines)"]
    return text


def report(comparison: Comparison, *, diffoscope: bool, out: Out, indent: str = "    ") -> None:
    """Each compared path in order, diffoscope for the first files that differ, a summary."""
    for label, entry in comparison.same_files:
        what = f"-> {entry.target}" if entry.kind == "symlink" else f"(sha256 {entry.digest[:16]})"
        out(f"same: {label} {what}")
    for diff in comparison.differences:
        out(diff.line())
    content = [d for d in comparison.differences if d.content]
    if diffoscope and content and shutil.which("diffoscope") is None:
        out("diffoscope: not installed, no details (apt-get install diffoscope-minimal)")
    elif diffoscope and content:
        for i, diff in enumerate(content):
            assert diff.a is not None and diff.b is not None
            if i == DIFFOSCOPE_MAX_FILES:
                out(f"diffoscope: skipped for {len(content) - i} more file(s)")
                break
            out(f"diffoscope {diff.path}:")
            for line in run_diffoscope(diff.a, diff.b):
                out(indent + line)
    files = len(comparison.same_files)
    dirs = len(comparison.same) - files
    if comparison.identical:
        out(f"identical: {files} files (and {dirs} directories)")
    else:
        out(f"different: {len(comparison.differences)} path(s) differ, {files} files are identical")


# --- copying the inputs -------------------------------------------------------------------------


def inside(path: Path, root: Path) -> str | None:
    """`path` relative to `root` as a string, or None if it is not below it."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return None


@dataclass(frozen=True)
class CopyPlan:
    skip: frozenset[str]  # relative paths not copied (with everything below them)
    links: dict[str, Path]  # relative path -> absolute target, made a symlink in the copy
    pool: str | None  # the pool, relative; its recipe outputs are not copied
    recipe_debs: frozenset[str]  # file names of the .debs the recipes build


def copy_plan(site: Site, *, also_skip: Iterable[Path] = ()) -> CopyPlan:
    from qlimage.pool import recipes

    root = site.paths.root
    skip = {r for p in (site.paths.bootfiles, *also_skip) if (r := inside(p, root))}
    links: dict[str, Path] = {}
    cache = inside(site.paths.cache, root)
    if cache is not None:
        links[cache] = site.paths.cache  # the download cache is shared, not copied
    pool = inside(site.paths.pool, root)
    debs = frozenset(recipes.recipe_output(site, r).name for r in site.recipes)
    return CopyPlan(frozenset(skip), links, pool, debs)


def copy_inputs(src: Path, dest: Path, plan: CopyPlan, *, reverse: bool = False) -> int:
    """Copy the site's inputs from `src` to `dest` (which must not exist): modes, owners (as
    root) and mtimes kept, symlinks as symlinks; `reverse` creates every directory's entries
    in reverse order. Returns the number of entries copied."""
    as_root = os.geteuid() == 0
    count = 0

    def skipped(rel: str, name: str, parent: str) -> bool:
        if name in SKIP_NAMES or name.startswith(TMP_PREFIX) or rel in plan.skip:
            return True
        if parent == "" and name.startswith(".doit.db"):
            return True
        return parent == plan.pool and name in plan.recipe_debs

    def owner(s: Path, d: Path) -> None:
        if as_root:
            st = s.lstat()
            os.lchown(d, st.st_uid, st.st_gid)

    def copy_dir(s_dir: Path, d_dir: Path, parent: str) -> None:
        nonlocal count
        names = sorted(os.listdir(s_dir), key=os.fsencode, reverse=reverse)
        for name in names:
            rel = f"{parent}/{name}" if parent else name
            s, d = s_dir / name, d_dir / name
            if skipped(rel, name, parent):
                continue
            count += 1
            if rel in plan.links:
                os.symlink(plan.links[rel], d)
                continue
            st = s.lstat()
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(s), d)
                owner(s, d)
            elif stat.S_ISDIR(st.st_mode):
                os.mkdir(d)
                copy_dir(s, d, rel)
                owner(s, d)
                shutil.copystat(s, d, follow_symlinks=False)
            elif stat.S_ISREG(st.st_mode):
                shutil.copyfile(s, d, follow_symlinks=False)
                owner(s, d)  # before the mode: chown clears setuid
                shutil.copystat(s, d, follow_symlinks=False)
            elif as_root and not stat.S_ISSOCK(st.st_mode):
                os.mknod(d, st.st_mode, st.st_rdev)  # fifos and device nodes in chroots
                owner(s, d)
                shutil.copystat(s, d, follow_symlinks=False)
            else:
                count -= 1

    dest.mkdir(parents=False)
    copy_dir(src, dest, "")
    owner(src, dest)
    shutil.copystat(src, dest, follow_symlinks=False)
    return count


def check_copy(site: Site, copy: Site) -> None:
    """The copy must build into its own outputs and read the same inputs as the site."""
    orig, new = site.paths.root, copy.paths.root
    problems: list[str] = []

    def counterpart(path: Path) -> Path | None:
        rel = inside(path, orig)
        return None if rel is None else new / rel

    outputs = ["bootfiles"] + (["pool"] if site.recipes else [])
    for name in outputs:
        path, copied = getattr(site.paths, name), getattr(copy.paths, name)
        if counterpart(path) != copied:
            problems.append(
                f"paths.{name} = {path} does not move with the site directory, so both builds "
                "would write the same outputs; repro-check needs a relative path inside the site"
            )
    inputs: list[tuple[str, Path | None, Path | None]] = [
        (f"paths.{n}", getattr(site.paths, n), getattr(copy.paths, n))
        for n in ("pool", "images", "nodes", "overlays", "rootfs", "chroots", "modules", "cache")
        if n not in outputs
    ]
    inputs += [
        ("kernel.deb", site.kernel_deb, copy.kernel_deb),
        ("head.shadow", site.head_shadow, copy.head_shadow),
    ]
    for name, path, copied in inputs:
        if path is None or copied is None or copied == path:
            continue
        if counterpart(path) != copied:
            problems.append(
                f"{name} = {path} is a relative path leaving the site directory; "
                "repro-check copies only the site directory: make it absolute"
            )
    if problems:
        raise QlimageError("; ".join(problems))


# --- building -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Build:
    variant: Variant
    status: int
    seconds: float
    log: Path
    started: float
    faked: bool

    def tail(self, n: int = LOG_TAIL) -> list[str]:
        lines = self.log.read_text(errors="replace").splitlines()
        return lines[-n:]


def timezone(name: str) -> str:
    if name == "Pacific/Auckland" and not Path("/usr/share/zoneinfo", name).exists():
        return AUCKLAND_RULE
    return name


def build_env(site: Site, variant: Variant) -> dict[str, str]:
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    env["TZ"] = timezone(variant.tz)
    env["PYTHONHASHSEED"] = variant.hash_seed
    # SOURCE_DATE_EPOCH is left as it is: the same for both, and what `qlimage build` in this
    # shell would see (site.toml's value wins; without one, the environment's is the site's).
    env["QLIMAGE_CACHE"] = str(site.paths.cache)  # likewise: the same download cache
    return env


def run_build(site: Site, copy_root: Path, variant: Variant, log: Path) -> Build:
    """`python -m qlimage -C <copy> build` under the variant's conditions, output to `log`."""
    # -P: the copy's own directory (the demo site contains a qlimage/) is not on sys.path.
    cmd = [sys.executable, "-P", "-m", "qlimage", "-C", str(copy_root), "build"]
    env = build_env(site, variant)
    faketime = shutil.which("faketime") if variant.faketime else None
    if faketime:
        cmd = [faketime, "-f", FAKETIME_OFFSET, *cmd]
        env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
        env["NO_FAKE_STAT"] = "1"  # shifted file mtimes would be faketime's doing, not ours
    started = time.time()
    with log.open("wb") as f:
        proc = run(
            cmd, cwd=copy_root, env=env, umask=variant.umask, stdout=f, stderr=STDOUT, check=False
        )
    return Build(variant, proc.returncode, time.time() - started, log, started, bool(faketime))


def package_digest() -> str:
    """The qlimage code and data the builds run (they are inputs too: the runner, /init...)."""
    package = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(package):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_NAMES)
        for name in sorted(filenames):
            path = Path(dirpath, name)
            h.update(path.relative_to(package).as_posix().encode() + b"\0")
            h.update(file_digest(path).encode())
    return h.hexdigest()


def output_roots(copy: Site) -> list[str]:
    """What a build produces that nodes or the pool consume, relative to the site directory."""
    from qlimage.layout import Layout
    from qlimage.pool import recipes

    layout = Layout(copy)
    roots = [layout.tftpboot, layout.pxelinux_cfg, layout.qlustar]
    roots += [recipes.recipe_output(copy, r) for r in copy.recipes]
    labels = []
    for path in roots:
        rel = inside(path, copy.paths.root)
        assert rel is not None  # check_copy made sure
        labels.append(rel)
    return labels


def repro_check(
    site_root: Path,
    *,
    keep: bool = False,
    diffoscope: bool = True,
    out: Out = print,
    workdir: Path | None = None,
) -> int:
    """Build the site twice from scratch (see the module docstring) and compare the outputs.

    0: identical; 1: something differs, or only the second build failed (findings);
    QlimageError (status 2): the site cannot be checked (bad site, paths that do not move
    with a copy, the first build fails). `workdir` holds the temporary directory.
    """
    site = load_site(site_root)
    tmp = Path(tempfile.mkdtemp(prefix="qlimage-repro.", dir=workdir)).resolve()
    try:
        plan = copy_plan(site, also_skip=[tmp])
        copies: dict[str, Site] = {}
        for v in VARIANTS:
            (tmp / v.name).mkdir()
            dest = tmp / v.name / site.paths.root.name
            n = copy_inputs(site.paths.root, dest, plan, reverse=v.reverse)
            copies[v.name] = load_site(dest)
            check_copy(site, copies[v.name])
        out(f"repro-check: {site.name}: {n} input paths copied to {tmp}/{{a,b}}")

        code = package_digest()
        builds: list[Build] = []
        for v in VARIANTS:
            if builds and time.time() - builds[-1].started < 1.5:
                time.sleep(1.5)  # a different clock, even for a very quick build
            faked = v.faketime and shutil.which("faketime") is not None
            out(f"repro-check: building {v.name} ({v.describe(faked)}) ...")
            build = run_build(site, copies[v.name].paths.root, v, tmp / f"build-{v.name}.log")
            builds.append(build)
            if build.status != 0:
                out(f"repro-check: build {v.name} failed (status {build.status}); its log ends:")
                for line in build.tail():
                    out("    " + line)
                if v is VARIANTS[0]:
                    raise QlimageError(
                        f"{site.name}: the build of the copy failed, so nothing can be compared",
                        hint="`qlimage build` must work first; --keep keeps the build logs",
                    )
                out(f"repro-check: build a succeeded, so the build depends on: {v.describe(faked)}")
                return 1
            out(f"repro-check: built {v.name} in {build.seconds:.1f} s")

        if package_digest() != code:
            out(
                "repro-check: warning: qlimage's own files changed while the builds ran; "
                "differences may come from that edit: run the check again"
            )
        roots = output_roots(copies["a"])
        comparison = compare_trees(copies["a"].paths.root, copies["b"].paths.root, roots)
        report(comparison, diffoscope=diffoscope, out=out)
        if comparison.identical:
            return 0
        if not keep:
            out("repro-check: run it with --keep to keep both trees for a closer look")
        return 1
    finally:
        if keep:
            out(f"repro-check: kept {tmp} (a/, b/, build-a.log, build-b.log)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
