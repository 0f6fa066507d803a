"""The build stamp: how a `qlimage build` that has nothing to do says so in constant time.

A full, successful `qlimage build` ends (under the build lock) by writing a stamp: the stat keys
(inode, size, mtime, ctime) of every input the graph reads and of the outputs doit checks, and
the environment it depends on. The next `qlimage build` without doit arguments recomputes that
fingerprint before loading the site (nothing here imports jsonschema, doit or Jinja) and stops
with "nothing to do" when it is unchanged; anything else runs the full build.

Why stat keys are enough: ctime cannot be set back by a user, so every write, chmod, rename or
replace of an entry changes its key, and a directory's key changes when an entry is added,
removed or renamed in it. Every tree is walked whole (over-approximating what the graph reads
only costs a full build); symlinks are keyed both as links and by their targets.

A file edited while a build runs may have been read before the edit: a stamp is written only
when no input's ctime is newer than the build's start (minus a margin for the file system's
coarse clock), else the next build does the work and writes it. Every command that may run
tasks removes the stamp first, under the build lock (`claim`).

Inputs and outputs have a digest each. When only the inputs changed (a node edited), the build
that follows knows every served output is as the last full build left it: `claim` says so under
the lock, and the node bundles and the clamp of served directories then skip their checks of
10,000 node directories (`outputs_trusted`).
"""

from __future__ import annotations

import hashlib
import json
import marshal
import os
import stat
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlimage.atomic import write_text
from qlimage.layout import (
    BUILD_STAMP,
    HOST_PIECES,
    LOCK,
    POOL_CACHE,
    RUNNING,
    VALIDATION_CACHE,
    Layout,
)

if TYPE_CHECKING:
    from qlimage.site import Site

FORMAT = 2
# An input whose ctime is within this of the build's start (or later) may have changed after
# the graph read it. The kernel stamps files with a coarse clock (a tick behind at most); a
# network file system with its server's clock: two seconds absorb both.
MARGIN_NS = 2_000_000_000
# The environment the graph reads (the epoch and the cache directly, HOME through `~` paths),
# besides every QLIMAGE_* variable.
ENV = ("SOURCE_DATE_EPOCH", "HOME")
# Never inputs: byte code is rewritten by the interpreter whenever it likes.
SKIPPED_NAMES = frozenset({"__pycache__"})
# Never inputs either, directly below the site root: version control, the virtual environment
# and the tools' caches (a site kept in git changes .git with every commit). Only there: an
# overlay may well carry a `.git` directory into an image.
SKIPPED_AT_ROOT = (".git", ".venv", ".pytest_cache", ".mypy_cache", ".ruff_cache")
# Packages whose code decides what the graph writes, besides qlimage itself.
LIBRARIES = ("doit", "jinja2", "jsonschema", "markupsafe")
# State files below bootfiles/ that come and go with every command (or are mere caches).
VOLATILE = frozenset({LOCK, RUNNING, BUILD_STAMP, VALIDATION_CACHE, POOL_CACHE, HOST_PIECES})

Key = tuple[int, int, int, int]


def started() -> int:
    """The moment a build starts, before it reads any input (compare `write`)."""
    return time.time_ns()


def stat_key(path: str, *, follow: bool) -> Key | None:
    try:
        st = os.stat(path, follow_symlinks=follow)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def walk(root: str, skipped: frozenset[str]) -> Iterator[tuple[str, Key | None, Key | None]]:
    """(path, its own key, its target's key when it is a link) for the root and everything
    below it, not entering symlinked directories (the graph does not either) nor `skipped`."""
    own = stat_key(root, follow=False)
    yield root, own, stat_key(root, follow=True)
    if own is None or not stat.S_ISDIR(os.stat(root, follow_symlinks=False).st_mode):
        return
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            if e.name in SKIPPED_NAMES or e.path in skipped:
                continue
            st = e.stat(follow_symlinks=False)
            key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if stat.S_ISLNK(st.st_mode):
                yield e.path, key, stat_key(e.path, follow=True)
            else:
                yield e.path, key, None
                if stat.S_ISDIR(st.st_mode):
                    stack.append(e.path)


def input_entries(
    plan: dict[str, Any],
) -> Iterator[tuple[str, Key | None, Key | None]]:
    skipped = frozenset(plan["skipped"])
    for tree in plan["trees"]:
        yield from walk(tree, skipped)
    for path in plan["files"]:
        yield path, stat_key(path, follow=False), stat_key(path, follow=True)


def output_entries(
    plan: dict[str, Any], known: dict[str, Key | None] | None = None
) -> Iterator[tuple[str, Key | None, Key | None]]:
    """`known`: directories whose key is already known, or that note each key seen."""
    # bootfiles/ by its listing: its own key changes with the lock's marker and this stamp.
    bootfiles = plan["bootfiles"]
    try:
        names = sorted(n for n in os.listdir(bootfiles) if n not in VOLATILE)
    except OSError:
        names = []
    for name in names:
        path = os.path.join(bootfiles, name)
        yield path, stat_key(path, follow=False), stat_key(path, follow=True)
    # A target's directory changes when the target comes or goes, which is all doit checks of a
    # target. Keyed where it leads: a directory that is a link (a node's) is replaced by a
    # rename in the directory above, which is keyed too. doit compares file_deps themselves.
    for path in plan["directories"]:
        if known is None:
            yield path, None, stat_key(path, follow=True)
        elif path in known:
            yield path, None, known[path]
        else:
            known[path] = key = stat_key(path, follow=True)
            yield path, None, key
    for path in plan["file_dep"] + plan["keyed"]:
        yield path, stat_key(path, follow=False), stat_key(path, follow=True)


def inputs_digest(
    plan: dict[str, Any], entries: Iterable[tuple[str, Key | None, Key | None]] | None = None
) -> str:
    """The inputs with the environment and the interpreter. `entries`: the input entries
    when the caller has them already."""
    env = {k: v for k, v in os.environ.items() if k in ENV or k.startswith("QLIMAGE_")}
    inputs = hashlib.sha256(json.dumps([FORMAT, sys.version, sorted(env.items())]).encode())
    for entry in input_entries(plan) if entries is None else entries:
        inputs.update(repr(entry).encode())
    return inputs.hexdigest()


def outputs_digest(plan: dict[str, Any], known: dict[str, Key | None] | None = None) -> str:
    outputs = hashlib.sha256()
    for entry in output_entries(plan, known):
        outputs.update(repr(entry).encode())
    return outputs.hexdigest()


def settled_entries(
    entries: Iterable[tuple[str, Key | None, Key | None]], since_ns: int
) -> list[tuple[str, Key | None, Key | None]] | None:
    """The entries, or None as soon as one changed at `since_ns` or later: then no stamp is
    written, and the rest need not be looked at (a build right after an edit, the usual
    case of a script, stops at the site's own files)."""
    settled = []
    for entry in entries:
        _, own, target = entry
        if (own is not None and own[3] >= since_ns) or (
            target is not None and target[3] >= since_ns
        ):
            return None
        settled.append(entry)
    return settled


def stamp_path(site_root: Path) -> Path | None:
    """Where the site's stamp is, from site.toml alone (no schema check: a stamp is only ever
    found for a site.toml that built)."""
    from qlimage.site.load import SITE_FILE, make_paths

    root = site_root.resolve()
    try:
        raw = tomllib.loads((root / SITE_FILE).read_text())
        return Layout(make_paths(root, raw).bootfiles).build_stamp
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None  # the full load reports what is wrong with site.toml


# The stamp that `up_to_date` found with the outputs as stamped (its path and its own stat key,
# for `claim` to see it is still that stamp), and whether `claim` then trusted the outputs.
_outputs_as_stamped: tuple[str, Key | None] | None = None
_trusted = False
# The keys of the output directories as `up_to_date` saw them: with trusted outputs, what the
# stamped build left. The stamp after an edit takes the keys of the node directories the build
# left alone from here (`write`'s `settled`) instead of stat'ing 10,000 of them again.
_seen: dict[str, Key | None] = {}


def up_to_date(site_root: Path, meanwhile: Callable[[], object] | None = None) -> bool:
    """Whether the last full build's stamp still matches every input and output. When only
    inputs differ, the stamp is remembered for `claim`. `meanwhile`: what the build that
    follows then does first (see `outputs_seen`)."""
    global _outputs_as_stamped, _seen
    _outputs_as_stamped, _seen = None, {}
    path = stamp_path(site_root)
    if path is None:
        return False
    try:
        with open(path, "rb") as f:
            key = fstat_key(f.fileno())
            stamp = json.loads(f.read())
    except (OSError, ValueError):
        return False
    if not isinstance(stamp, dict) or stamp.get("format") != FORMAT:
        return False
    try:
        # A copied site carries the stamp of the one it was copied from: it names other paths.
        plan = stamp["plan"]
        if plan["bootfiles"] != str(path.parent) or plan["root"] != str(site_root.resolve()):
            return False
        if inputs_digest(plan) == stamp["inputs"]:
            return bool(outputs_digest(plan) == stamp["outputs"])
        outputs, seen = outputs_seen(plan, meanwhile)
        if outputs == stamp["outputs"]:
            _outputs_as_stamped, _seen = (str(path), key), seen
        return False
    except (KeyError, TypeError):
        return False


def outputs_seen(
    plan: dict[str, Any], meanwhile: Callable[[], object] | None
) -> tuple[str, dict[str, Key | None]]:
    """The outputs' digest and the directories' keys, looked at by a forked copy of this
    process while this one runs `meanwhile` (run.fork_beside): at 10,000 nodes, 10,000 stats
    of node directories beside the build's imports (0.04 s of a one-node edit's build)."""

    def look() -> bytes:
        seen: dict[str, Key | None] = {}
        return marshal.dumps((outputs_digest(plan, seen), seen))

    if meanwhile is not None:
        from qlimage.run import fork_beside

        found = fork_beside(look, meanwhile)
        if found is not None:
            outputs, seen = marshal.loads(found)
            return outputs, seen
    seen = {}
    return outputs_digest(plan, seen), seen


def fstat_key(fd: int) -> Key:
    st = os.fstat(fd)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def claim(site: Site) -> None:
    """Under the build lock, before anything runs: remove the stamp (what runs now may change
    what it stamped). The outputs are trusted for this build when `up_to_date` found them as
    stamped and this is still the stamp it read: every command that may run tasks removes it
    here first, so no other build has run since, and its outputs are those of the full build
    that wrote the stamp."""
    global _outputs_as_stamped, _trusted, _seen
    path = Layout(site).build_stamp
    _trusted = _outputs_as_stamped == (str(path), stat_key(str(path), follow=False))
    _outputs_as_stamped = None
    if not _trusted:
        _seen = {}
    path.unlink(missing_ok=True)


def outputs_trusted() -> bool:
    """Whether every served output is as the last full build left it (`claim`): its node
    directories, their links and the bundle table, as the table says."""
    return _trusted


def package_dir(name: str) -> str | None:
    module = sys.modules.get(name)
    if module is None:
        import importlib.util

        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec else None
    else:
        origin = getattr(module, "__file__", None)
    return str(Path(origin).parent) if origin else None


def under(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


# What the stamp of a site covers (its plan): every input tree and file, and what doit checks
# of the outputs (`targets` and `file_dep`: every file the graph's tasks named).


def inputs_plan(site: Site) -> dict[str, Any]:
    from qlimage.boot import pxelinux

    p = site.paths
    inputs = [p.root, p.pool, p.images, p.nodes, p.overlays, p.rootfs, p.chroots, p.modules]
    trees = [p.root] + [t for t in inputs[1:] if not under(t, [p.root])] + [p.cache]
    code = [package_dir(n) for n in ("qlimage", *LIBRARIES)]
    files = [site.kernel_deb, site.head_shadow, pxelinux.PXELINUX, pxelinux.LDLINUX]
    return {
        "trees": [str(t) for t in trees] + [c for c in code if c],
        "skipped": [str(p.bootfiles), str(p.cache)] + [str(p.root / n) for n in SKIPPED_AT_ROOT],
        "files": [str(f) for f in files if f],
        "root": str(p.root),
    }


def outputs_plan(site: Site, targets: Iterable[str], file_dep: Iterable[str]) -> dict[str, Any]:
    from qlimage.boot import pxelinux

    layout = Layout(site)
    # rpartition is dirname for the absolute, normalized paths the tasks name, at a third of
    # its cost: 40,000 of them at 10,000 nodes.
    parents = {t.rpartition("/")[0] for t in targets}
    directories = parents | {d.rpartition("/")[0] for d in parents}
    return {
        "file_dep": sorted(set(file_dep)),
        "bootfiles": str(layout.bootfiles),
        "directories": sorted(directories - {str(layout.bootfiles)}),
        # Written in place, they would change no directory: what `outputs_trusted` relies on.
        "keyed": [str(layout.bundle_table), str(layout.pxelinux_cfg / pxelinux.HOSTS_INDEX)],
    }


def write(
    site: Site,
    started_ns: int,
    targets: Iterable[str],
    file_dep: Iterable[str],
    settled: Iterable[str] = (),
) -> bool:
    """After a full, successful build, under the lock: stamp it, unless an input changed while
    it ran (then the next build does the work, and stamps). `settled`: output directories
    this build left as the stamped build did, when it trusted the outputs (`claim`): their
    keys are the ones `up_to_date` saw."""
    path = Layout(site).build_stamp
    read = inputs_plan(site)
    entries = settled_entries(input_entries(read), started_ns - MARGIN_NS)  # one walk for both
    if entries is None:
        path.unlink(missing_ok=True)
        return False
    plan = {**read, **outputs_plan(site, targets, file_dep)}
    known = {d: _seen[d] for d in settled if d in _seen} if _trusted else {}
    stamp = {
        "format": FORMAT,
        "plan": plan,
        "inputs": inputs_digest(plan, entries),
        "outputs": outputs_digest(plan, known),
    }
    write_text(path, json.dumps(stamp))
    return True
