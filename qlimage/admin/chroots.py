"""UnionFS chroots (the seed's Manage Chroots dialog): full Debian trees the head exports by NFS
and nodes mount as the lowest, read-only layer of their root union.

A chroot is its definition, `chroots/<name>/chroot.toml`, plus its tree on the head. The trees
this module makes live at `[paths] chroot_trees/<name>` (default /srv/qlustar/chroots/<name>);
a definition written by hand may name any other `path`, and such a tree is never deleted here.

`create` builds the tree with mmdebstrap from the site's Debian archive (its [archive] sources,
else the head's apt sources), with the .debs kept in the download cache (`<cache>/chroots/`)
through mmdebstrap's sync-in/sync-out hooks, so a second chroot of the same flavor downloads
nothing but the indexes; its output becomes progress lines (the download's bytes and packages,
the installs' packages: qlimage.progress.MmdebstrapLog). `clone` copies a tree with `cp -a`
(owners, modes, links, xattrs, reflinks where the file system has them). Trees are made beside
their place and renamed in, and the definition is written last: a failed create or clone leaves
nothing behind. Every change happens under the build lock and ends with the rebuild that writes
the NFS exports.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import stat
import sys
import tempfile
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlimage.atomic import TMP_PREFIX, write_text
from qlimage.errors import BuildError, ConfigError, QlimageError
from qlimage.image.publish import build_lock
from qlimage.pool.mirror import site_sources
from qlimage.progress import MmdebstrapLog
from qlimage.run import STDOUT, run
from qlimage.site import Site
from qlimage.site.load import CHROOT_NAME, validate
from qlimage.site.model import Chroot
from qlimage.trees import remove_in_root

DEFINITION = "chroot.toml"
NAME_EXPECTED = "lower-case letters, digits, '.', '_', '-' (at most 64), first a letter or digit"
FLAVOR = re.compile(r"[a-z][a-z0-9]*")
VERSION = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}")
DEFAULT_VERSION = "13.0"
DEFAULT_FLAVOR = "bookworm"
# Small enough for a test and for the nodes' page cache, complete enough to be a Debian system
# the admin adds packages to (tasks); `minbase` would add apt, `essential` is the smallest.
VARIANT = "essential"
TREE_MODE = 0o755
# Keys in the order a written definition lists them.
KEY_ORDER = ("description", "server", "port", "path", "export", "flavor", "version", "tasks")


@dataclass(frozen=True)
class Listed:
    chroot: Chroot
    users: tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    name: str
    tree: Path | None  # the tree made or removed (None: a tree this module does not manage)
    rebuilt: int | None  # the build's status; None: no build ran (--no-build)
    changed: bool = True  # False: the site was already as asked (edit), nothing rebuilt


# --- names and users ---------------------------------------------------------------------------


def check_name(name: str, what: str = "chroot name") -> str:
    if len(name) > 64 or not CHROOT_NAME.fullmatch(name):
        raise QlimageError(f"{what} {name!r}: expected {NAME_EXPECTED}")
    return name


def known(site: Site, name: str) -> Chroot:
    check_name(name)
    if name not in site.chroots:
        have = ", ".join(sorted(site.chroots)) or "none"
        raise QlimageError(
            f"no chroot {name!r} (no {site.paths.chroots.name}/{name}/{DEFINITION}; known: {have})"
        )
    return site.chroots[name]


def users(site: Site, name: str) -> list[str]:
    """Every image whose definition names the chroot and every node whose own chroot option
    does, each with the file that says so."""
    out = [
        f"image {i.name} ({rel(site, i.source)})"
        for i in sorted(site.images.values(), key=lambda i: i.name)
        if i.chroot == name
    ]
    out += [
        f"node {h.name} ({h.source}: {h.option_sources.get('chroot', 'options')})"
        for h in site.hosts
        if h.options.get("chroot") == name
    ]
    return out


def check_unused(site: Site, name: str) -> None:
    used = users(site, name)
    if used:
        raise QlimageError(
            f"chroot {name!r} is used by " + ", ".join(used) + "; point them at another chroot"
            " (images.d chroot, nodes' chroot option) before removing it"
        )


def listing(site: Site) -> list[Listed]:
    return [Listed(c, tuple(users(site, n))) for n, c in sorted(site.chroots.items())]


def rel(site: Site, path: Path) -> str:
    try:
        return str(path.relative_to(site.paths.root))
    except ValueError:
        return str(path)


# --- the definition file -----------------------------------------------------------------------


def definition_path(site: Site, name: str) -> Path:
    return site.paths.chroots / name / DEFINITION


def toml_value(value: Any) -> str:
    """A string, integer or list of strings as TOML. Strings are JSON-quoted: JSON's escapes
    are TOML's, and DEL, which JSON leaves raw and TOML forbids raw, is escaped too."""
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def render_definition(data: Mapping[str, Any]) -> str:
    keys = [k for k in KEY_ORDER if k in data] + sorted(k for k in data if k not in KEY_ORDER)
    return "".join(f"{k} = {toml_value(data[k])}\n" for k in keys)


def write_definition(site: Site, name: str, data: Mapping[str, Any]) -> Path:
    """chroot.toml, checked against the chroot schema before it is written (the same check a
    build makes), written beside and renamed in."""
    text = render_definition(data)
    where = f"{site.paths.chroots.name}/{name}/{DEFINITION}"
    problems = validate(tomllib.loads(text), "chroot", where)
    if problems:
        raise ConfigError(problems)
    path = definition_path(site, name)
    require_real_dir_or_absent(site.paths.chroots, "the chroots directory")
    require_real_dir_or_absent(path.parent, f"{where}'s directory")
    write_text(path, text, 0o644)
    return path


def read_definition(site: Site, name: str) -> dict[str, Any]:
    path = definition_path(site, name)
    require_real_dir_or_absent(path.parent, f"chroot {name!r}'s directory")
    if path.is_symlink():
        raise QlimageError(f"{rel(site, path)}: a link; expected the chroot's own file")
    return tomllib.loads(path.read_text())


def require_real_dir_or_absent(path: Path, what: str) -> None:
    """A link in place of one of our directories would move what we write or delete elsewhere."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise QlimageError(f"{what} {path} is not a directory (a link or a file); refusing")


def is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except FileNotFoundError:
        return False


def one_line(text: str, what: str) -> str:
    if re.search(r"[\x00-\x1f\x7f]", text) or len(text) > 200:
        raise QlimageError(f"{what} {text!r}: expected one line of at most 200 characters")
    return text


# --- trees ---------------------------------------------------------------------------------------


def managed_tree(site: Site, chroot: Chroot) -> Path | None:
    """The chroot's tree if this module manages it (chroot_trees/<name>), else None."""
    mine = site.paths.chroot_trees / chroot.name
    return mine if Path(chroot.path) == mine else None


def new_tree_place(site: Site, name: str) -> Path:
    """chroot_trees/<name>, which must not exist yet; chroot_trees is made (0755) if missing."""
    trees = site.paths.chroot_trees
    require_real_dir_or_absent(trees, "[paths] chroot_trees")
    trees.mkdir(mode=TREE_MODE, parents=True, exist_ok=True)
    place = trees / name
    if os.path.lexists(place):
        raise QlimageError(f"{place} exists; remove it or choose another chroot name")
    return place


def make_tree_aside(place: Path, fill: Any) -> None:
    """Run `fill(tree)` on a fresh path beside `place`, then rename it in; on any failure
    nothing is left behind."""
    work = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}chroot.", dir=place.parent))
    try:
        tree = work / place.name
        fill(tree)
        os.chmod(tree, TREE_MODE)
        os.rename(tree, place)
    finally:
        remove_in_root(work)


def debian_mirrors(site: Site, flavor: str) -> list[str]:
    """apt lines of the sources for the flavor's suites (bookworm, bookworm-updates,
    bookworm-security, ...), from site.toml's [archive] else the head's apt sources."""
    lines = [
        f"deb {s.uri} {s.suite} {' '.join(s.components)}"
        for s in site_sources(site)
        if s.suite == flavor or s.suite.startswith((f"{flavor}-", f"{flavor}/"))
    ]
    if not lines:
        raise QlimageError(
            f"no Debian archive source for flavor {flavor!r} (site.toml [archive] sources, else"
            " the head's apt sources)",
            hint="add one to [archive] sources or choose another --flavor",
        )
    return lines


def deb_cache(site: Site, flavor: str) -> Path:
    path = site.paths.cache / "chroots" / f"{flavor}_{site.archive.arch}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def mmdebstrap_command(
    site: Site, flavor: str, packages: Sequence[str], tree: Path, cache: Path
) -> list[str]:
    """The documented way to keep mmdebstrap's .debs across runs (mmdebstrap(1), "sync-in"):
    keep them (skip download/empty, essential/unlink), copy the cache in before and out after,
    then drop them from the tree, which nodes mount."""
    c = shlex.quote(str(cache))
    return [
        "mmdebstrap",
        "--verbose",  # apt's and dpkg's lines, which carry the counts progress is made of
        f"--variant={VARIANT}",
        f"--architectures={site.archive.arch}",
        *([f"--include={','.join(packages)}"] if packages else []),
        "--skip=download/empty",
        "--skip=essential/unlink",
        '--setup-hook=mkdir -p "$1"/var/cache/apt/archives/',
        f"--setup-hook=sync-in {c} /var/cache/apt/archives/",
        f"--customize-hook=sync-out /var/cache/apt/archives {c}",
        '--customize-hook=rm -f "$1"/var/cache/apt/archives/*.deb',
        flavor,
        str(tree),
        *debian_mirrors(site, flavor),
    ]


def bootstrap_tree(name: str, command: list[str]) -> None:
    """Run mmdebstrap, its output read into progress lines (qlimage.progress.MmdebstrapLog)
    instead of shown: hundreds of apt and dpkg lines per chroot would bury the progress. A
    failure shows its last lines on stderr, then the one-line error."""
    log = MmdebstrapLog(f"chroot {name}")
    proc = run(command, stderr=STDOUT, on_stdout=log.feed, check=False)
    log.close(ok=proc.returncode == 0)
    if proc.returncode != 0:
        print("\n".join(log.tail), file=sys.stderr, flush=True)
        raise BuildError(
            f"chroot {name}: mmdebstrap failed with status {proc.returncode} (its last messages"
            " are above); nothing was created"
        )


def task_packages(site: Site, tasks: Sequence[str]) -> list[str]:
    missing = [t for t in tasks if t not in site.chroot_tasks]
    if missing:
        have = ", ".join(sorted(site.chroot_tasks)) or "none"
        raise QlimageError(
            f"--task {missing[0]!r}: no such chroot task (site.toml [chroot_tasks] has: {have})"
        )
    return sorted({p for t in tasks for p in site.chroot_tasks[t].packages})


# --- the commands --------------------------------------------------------------------------------


def create(
    site: Site,
    name: str,
    *,
    description: str = "",
    server: str | None = None,
    port: int | None = None,
    export: str | None = None,
    flavor: str = DEFAULT_FLAVOR,
    version: str = DEFAULT_VERSION,
    tasks: Sequence[str] = (),
    wait: bool = True,
    build: bool = True,
) -> Outcome:
    """Build chroot_trees/<name> with mmdebstrap, write its definition, rebuild."""
    check_name(name)
    data = definition_data(description, server, port, export, flavor, version, tasks)
    packages = task_packages(site, tasks)
    with build_lock(site.paths.bootfiles, wait=wait):
        refuse_existing(site, name)
        place = new_tree_place(site, name)
        cache = deb_cache(site, flavor)
        debian_mirrors(site, flavor)  # no source for the flavor: refused before any work

        def bootstrap(tree: Path) -> None:
            bootstrap_tree(name, mmdebstrap_command(site, flavor, packages, tree, cache))

        status = install(site, name, place, bootstrap, data, wait=wait, build=build)
    return Outcome(name, place, status)


def definition_data(
    description: str,
    server: str | None,
    port: int | None,
    export: str | None,
    flavor: str,
    version: str,
    tasks: Sequence[str],
) -> dict[str, Any]:
    """The new definition, each value checked here with a one-line error naming its option
    (the schema checks the whole file again before it is written)."""
    if not FLAVOR.fullmatch(flavor):
        raise QlimageError(f"--flavor {flavor!r}: expected a Debian suite name such as bookworm")
    if not VERSION.fullmatch(version):
        raise QlimageError(f"--version {version!r}: expected a Qlustar release x.y, e.g. 13.0")
    for t in tasks:
        check_name(t, "--task")
    data: dict[str, Any] = {"description": one_line(description, "--description")}
    if server is not None:
        try:
            ipaddress.IPv4Address(server)
        except ValueError:
            raise QlimageError(f"--server {server!r}: expected an IPv4 address") from None
        data["server"] = server
    if port is not None:
        if not 1 <= port <= 65535:
            raise QlimageError(f"--port {port}: expected 1 to 65535")
        data["port"] = port
    if export is not None:
        if not re.fullmatch(r"/[^\s\x00-\x1f\x7f]*", export) or len(export) > 1024:
            raise QlimageError(f"--export {export!r}: expected an absolute path, no white space")
        data["export"] = export
    data.update(flavor=flavor, version=version)
    if tasks:
        data["tasks"] = list(dict.fromkeys(tasks))
    return data


def refuse_existing(site: Site, name: str) -> None:
    if os.path.lexists(site.paths.chroots / name):
        raise QlimageError(
            f"chroot {name!r} exists ({site.paths.chroots.name}/{name}); choose another name"
        )


def clone(
    site: Site,
    source: str,
    name: str,
    *,
    description: str | None = None,
    wait: bool = True,
    build: bool = True,
) -> Outcome:
    """Copy a chroot's tree and definition to a new name (the way to test an upgrade; a
    rename is a clone and a remove). The clone's tree is chroot_trees/<name>; its export is its
    own tree unless given later, never the source's."""
    check_name(name, "new chroot name")
    if description is not None:
        one_line(description, "--description")
    with build_lock(site.paths.bootfiles, wait=wait):
        src = known(site, source)
        refuse_existing(site, name)
        tree = Path(src.path)
        if not is_real_dir(tree):
            raise QlimageError(f"chroot {source!r}: its tree {tree} is not a directory")
        data = read_definition(site, source)
        for key in ("path", "export"):  # they name the source's own tree
            data.pop(key, None)
        if description is not None:
            data["description"] = description
        place = new_tree_place(site, name)

        # cp -a keeps owners, modes, links, hard links, xattrs; a reflink where possible.
        def copy(t: Path) -> None:
            run(["cp", "-a", "--reflink=auto", "--", f"{tree}/.", str(t)])

        status = install(site, name, place, copy, data, wait=wait, build=build)
    return Outcome(name, place, status)


def install(
    site: Site,
    name: str,
    place: Path,
    fill: Callable[[Path], None],
    data: dict[str, Any],
    *,
    wait: bool,
    build: bool,
) -> int | None:
    """A new chroot, under the lock: its tree filled beside `place` and renamed in, then its
    definition (the tree goes again if that fails: never a definition without its tree nor
    a tree without one), then the rebuild. The build's status, None with --no-build."""
    make_tree_aside(place, fill)
    try:
        write_definition(site, name, data)
    except BaseException:
        remove_in_root(place)
        raise
    return rebuild(site, wait) if build else None


def edit(
    site: Site, name: str, *, description: str, wait: bool = True, build: bool = True
) -> Outcome:
    """Change the description and nothing else of the definition."""
    one_line(description, "--description")
    with build_lock(site.paths.bootfiles, wait=wait):
        known(site, name)
        data = read_definition(site, name)
        if data.get("description", "") == description:
            return Outcome(name, None, None, changed=False)
        data["description"] = description
        write_definition(site, name, data)
        status = rebuild(site, wait) if build else None
    return Outcome(name, None, status)


def remove(site: Site, name: str, *, wait: bool = True, build: bool = True) -> Outcome:
    """Remove the definition and the managed tree; refused while an image or node uses it.
    The caller has asked for the confirmation."""
    with build_lock(site.paths.bootfiles, wait=wait):
        chroot = known(site, name)
        check_unused(site, name)
        tree = managed_tree(site, chroot)
        # Every link checked before anything moves: a link in place of the definition's
        # directory, of chroot_trees or of the tree would make us delete what it points to.
        require_real_dir_or_absent(site.paths.chroots, "the chroots directory")
        require_real_dir_or_absent(site.paths.chroots / name, f"chroot {name!r}'s directory")
        if tree is not None:
            require_real_dir_or_absent(tree.parent, "[paths] chroot_trees")
            require_real_dir_or_absent(tree, f"chroot {name!r}'s tree")
        # The definition goes first, renamed away: a removal killed half-way leaves at worst
        # an undefined tree, never a defined chroot without its tree.
        doomed = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}remove.", dir=site.paths.chroots))
        try:
            os.rename(site.paths.chroots / name, doomed / "definition")
        finally:
            remove_in_root(doomed)
        if tree is not None and os.path.lexists(tree):
            gone = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}remove.", dir=tree.parent))
            try:
                os.rename(tree, gone / name)
            finally:
                remove_in_root(gone)
        status = rebuild(site, wait) if build else None
    return Outcome(name, tree, status)


def rebuild(site: Site, wait: bool) -> int:
    # The site changed under us: the graph must see the new definitions, not `site`.
    from qlimage.site import load_site
    from qlimage.tasks.run import run_graph

    return run_graph(load_site(site.paths.root), ["run"], wait=wait)
