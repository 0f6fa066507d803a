"""The staged root tree of an image, in this order:

1. its modules' trees, in the image's module order (later modules win);
2. the static overlays and whiteouts (overlays.py: common, then the image's own);
3. the node side at the same version as the head (node_files(): /sbin/init.qlustar, the runner
   package in /usr/lib/qlustar/runner and its launcher /usr/lib/qlustar/qlustar-runner);
4. root's password hash in /etc/shadow (rootpw.py);
5. /etc/qlustar/image.json and the changelogs in /usr/share/doc/qlustar-image.

Unpacked module trees are cached per package version and hard-linked into the stage, so a
rebuild with unchanged modules copies no file contents. Anything written into the stage after
step 1 must replace a path (unlink, then create), never write through a link into the cache.
The extra links do not reach the image: mksquashfs counts a file's links inside the tree it
packs, so a file linked from the cache is packed exactly as a copy would be (a test proves it).

The previous stage is renamed aside and deleted by a thread while the build goes on: deleting
tens of thousands of files and directories is seconds of waiting on the disk (every freed block,
one request each with online discard) that mksquashfs of the new stage hides.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from qlimage import contract
from qlimage.atomic import TMP_PREFIX, atomic_path, write_bytes, write_text
from qlimage.errors import ConfigError, QlimageError
from qlimage.image import changelogs, overlays, rootpw
from qlimage.layout import Layout
from qlimage.pool.packages import ModulePackage, check_module_archives
from qlimage.progress import reading
from qlimage.run import run
from qlimage.site import Image, Site
from qlimage.trees import replace_in_root

STAMP = ".qlimage-unpacked"
# The node side (qlimage/node) in the image: the runner package is imported by its launcher
# under this name, from the directory beside the launcher (see qlimage/node/qlustar-runner).
RUNNER = contract.RUNNER_PATH.lstrip("/")
RUNNER_PACKAGE = "usr/lib/qlustar/runner/qlustar_runner"
INIT_QLUSTAR = contract.INIT_QLUSTAR_PATH.lstrip("/")


def module_tree_dir(site: Site, module: ModulePackage) -> Path:
    return Layout(site).module_tree(module.package, module.version)


def deb_stamp(deb: Path) -> str:
    st = deb.stat()
    return f"{deb.name} {st.st_size} {st.st_mtime_ns}\n"


def unpack_module(site: Site, module: ModulePackage) -> Path:
    """The module's file tree, unpacked once per .deb (re-unpacked if the .deb was replaced)."""
    tree = module_tree_dir(site, module)
    stamp = tree.parent / f"{tree.name}{STAMP}"
    if tree.is_dir() and stamp.exists() and stamp.read_text() == deb_stamp(module.path):
        return tree
    # dpkg-deb prints no progress: how far it has read the .deb (compressed bytes consumed) is
    # looked at from outside, so that the extraction itself stays dpkg-deb's own.
    with (
        atomic_path(tree, directory=True) as work,
        reading(module.path, f"unpack {module.path.name}") as tick,
    ):
        run(["dpkg-deb", "-x", module.path, work], on_tick=tick)
        os.chmod(work, 0o755)
    for derived in (".files", ".changelog"):  # computed from the old tree: recompute
        tree.with_name(tree.name + derived).unlink(missing_ok=True)
    write_text(stamp, deb_stamp(module.path))
    return tree


def input_problems(site: Site, modules: Sequence[ModulePackage]) -> list[str]:
    """What staging reads that can be checked before any task: every module archive (nothing
    in it may unpack outside its tree; see packages.check_module_archive) and every overlay
    layer (remove lines, special files). One line per problem, each naming its file, so
    `qlimage validate` and the build report them all at once."""
    problems: list[str] = []
    layout = Layout(site)
    cache = layout.pool_cache if layout.bootfiles.is_dir() else None
    try:
        check_module_archives(modules, cache)
    except QlimageError as e:
        problems += e.problems if isinstance(e, ConfigError) else [str(e)]
    names = sorted(site.images)
    for layer in sorted({la for n in names for la in overlays.layers(site.paths.overlays, n)}):
        problems += overlays.check_layer(layer)
    return problems


def resolved_modules_json(image: Image, modules: Sequence[ModulePackage]) -> str:
    data = {
        "image": image.name,
        "flavor": image.flavor,
        "version": image.version,
        "modules": [
            {"module": m.module, "package": m.package, "version": m.version} for m in modules
        ],
    }
    return json.dumps(data, indent=2) + "\n"


def replace_file(root: Path, rel: str, data: bytes, mode: int) -> None:
    """Install a file of ours at `rel` in the stage, owned by root. Its directories are resolved
    inside the stage (a module's link, even to an absolute path, means a path in the image), so
    nothing is ever written outside it, nor through a hard link into the module cache."""
    try:
        replace_in_root(root, rel, data, mode, (0, 0))
    except OSError as e:
        raise QlimageError(f"/{rel}: cannot install it in the staged image: {e.strerror}") from e


def node_files() -> dict[str, tuple[bytes, int]]:
    """{path in the image: (content, mode)} of every node file the pipeline installs in every
    image: init.qlustar, the runner launcher and the runner package's modules (sorted; no
    __pycache__, only the package's .py files)."""
    node = resources.files("qlimage.node")
    files = {
        INIT_QLUSTAR: (node.joinpath("init.qlustar").read_bytes(), 0o755),
        RUNNER: (node.joinpath("qlustar-runner").read_bytes(), 0o755),
    }
    for entry in node.joinpath("runner").iterdir():
        if entry.is_file() and entry.name.endswith(".py"):
            files[f"{RUNNER_PACKAGE}/{entry.name}"] = (entry.read_bytes(), 0o644)
    return dict(sorted(files.items()))


def node_files_digest() -> str:
    """One sha256 over the node files' paths, modes and contents (doit's change detection)."""
    h = hashlib.sha256()
    for path, (data, mode) in node_files().items():
        h.update(f"{path}\0{mode:o}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def stage_image(
    site: Site,
    image: Image,
    modules: Sequence[ModulePackage],
    dest: Path,
    *,
    previous: Path | None,
) -> list[changelogs.ModuleState]:
    """Build the staged tree at `dest` (replaced atomically). `previous` is the image's current
    generation (for the changelogs). Returns the module states the next build compares with."""
    trees = [unpack_module(site, m) for m in modules]
    states = {m.module: changelogs.module_state(m, t) for m, t in zip(modules, trees, strict=True)}
    prior = changelogs.load_state(previous / changelogs.STATE_DIR if previous else None)
    with atomic_path(dest, directory=True) as work:
        os.chmod(work, 0o755)
        for tree in trees:
            add_module_tree(tree, work)
        overlays.apply_overlays(site.paths.overlays, image.name, work)
        for path, (data, mode) in node_files().items():
            replace_file(work, path, data, mode)
        rootpw.set_root_hash(work, rootpw.image_root_hash(site, image))
        info = resolved_modules_json(image, modules).encode()
        replace_file(work, "etc/qlustar/image.json", info, 0o644)
        for name, data in changelogs.render(modules, states, prior).items():
            replace_file(work, f"{changelogs.DOC_DIR}/{name}", data, 0o644)
        set_aside(dest)  # last: a failed stage keeps the previous one
    with atomic_path(state_dir(dest), directory=True) as work:
        changelogs.save_state([states[m.module] for m in modules], work)
    return [states[m.module] for m in modules]


# Trees being deleted by a thread of this process: {path: thread}.
_removing: dict[Path, threading.Thread] = {}


def add_module_tree(tree: Path, work: Path) -> None:
    """Lay an unpacked module tree over the stage: hard links when both are on one filesystem
    (no file contents copied), else a copy (reflinks where the filesystem has them); both keep
    modes, owners and the links among the module's own files. Directories are always the
    stage's own, so an overlay adding to one never touches the cache."""
    same_fs = tree.stat().st_dev == work.stat().st_dev
    how = ["-l"] if same_fs else ["--reflink=auto"]
    run(["cp", "-a", *how, "--remove-destination", f"{tree}/.", work])


def set_aside(tree: Path) -> None:
    """Rename `tree` into a temporary directory beside it (at once) and delete it there in a
    background thread, with whatever a killed build set aside before. The threads are not
    daemons (the process exits only once they are done) and `finish_removals` waits for them
    within the build lock."""
    for stale in sorted(tree.parent.glob(f"{TMP_PREFIX}{tree.name}.old.*")):
        if stale not in _removing:
            remove_later(stale)
    if tree.is_symlink() or not tree.is_dir():
        return
    doomed = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{tree.name}.old.", dir=tree.parent))
    os.rename(tree, doomed / tree.name)
    remove_later(doomed)


def remove_later(path: Path) -> None:
    thread = threading.Thread(target=shutil.rmtree, args=(path, True), name=f"rm {path}")
    _removing[path] = thread
    thread.start()


def finish_removals() -> None:
    """Wait until every tree `set_aside` handed to a thread is gone."""
    while _removing:
        _removing.popitem()[1].join()


def state_dir(dest: Path) -> Path:
    """Beside the stage: what the published generation keeps for the next build's changelogs."""
    return dest.with_name(f"{dest.name}.state")


# Per path: type, permissions, owner, size, mtime, link target (empty unless a link), path;
# find ends each field with NUL, so a name holding tabs or newlines still parses as one record.
MANIFEST_FIELDS = "%y%m\\0%U:%G\\0%s:%T@\\0%l\\0%P\\0"


def write_manifest(tree: Path, output: Path) -> None:
    """The stage as doit sees it. Sizes and mtimes, not digests: the staged files are hard
    links into the module cache or fresh copies, so any content change shows in them, and
    hashing the whole tree on every stage would cost as much as packing it. find(1) lists the
    tens of thousands of paths in a fraction of what a walk in Python costs (the stage is
    rebuilt on the way to every pack, so this is paid each time)."""
    out = run(["find", tree, "-mindepth", "1", "-printf", MANIFEST_FIELDS], capture=True).stdout
    fields = out.split(b"\0")[:-1]
    records = sorted(zip(*[iter(fields)] * 5, strict=True), key=lambda r: r[4])
    text = b"".join(b"\t".join(r) + b"\n" for r in records)
    write_bytes(output, text)
