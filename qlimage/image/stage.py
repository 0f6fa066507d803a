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
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from qlimage import contract
from qlimage.atomic import atomic_path, write_text
from qlimage.errors import ConfigError, QlimageError
from qlimage.image import changelogs, overlays, rootpw
from qlimage.layout import Layout
from qlimage.pool.packages import ModulePackage, check_module_archives
from qlimage.run import run
from qlimage.site import Image, Site
from qlimage.trees import manifest, replace_in_root

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
    with atomic_path(tree, directory=True) as work:
        run(["dpkg-deb", "-x", module.path, work])
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
            run(["cp", "-a", "-l", "--remove-destination", f"{tree}/.", work])
        overlays.apply_overlays(site.paths.overlays, image.name, work)
        for path, (data, mode) in node_files().items():
            replace_file(work, path, data, mode)
        rootpw.set_root_hash(work, rootpw.image_root_hash(site, image))
        info = resolved_modules_json(image, modules).encode()
        replace_file(work, "etc/qlustar/image.json", info, 0o644)
        for name, data in changelogs.render(modules, states, prior).items():
            replace_file(work, f"{changelogs.DOC_DIR}/{name}", data, 0o644)
    with atomic_path(state_dir(dest), directory=True) as work:
        changelogs.save_state([states[m.module] for m in modules], work)
    return [states[m.module] for m in modules]


def state_dir(dest: Path) -> Path:
    """Beside the stage: what the published generation keeps for the next build's changelogs."""
    return dest.with_name(f"{dest.name}.state")


def write_manifest(tree: Path, output: Path) -> None:
    """The stage as doit sees it. Sizes and mtimes, not digests: the staged files are hard
    links into the module cache or fresh copies, so any content change shows in them, and
    hashing the whole tree on every stage would cost as much as packing it."""
    write_text(output, manifest(tree, content=False))
