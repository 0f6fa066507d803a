"""The staged root tree of an image: its modules' trees combined, in the image's module order.

Unpacked module trees are cached per package version and hard-linked into the stage, so a
rebuild with unchanged modules copies no file contents. Anything written into the stage after
that must replace a path (unlink, then create), never write through a link into the cache.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from qlimage.atomic import atomic_path, write_text
from qlimage.pool import ModulePackage
from qlimage.run import run
from qlimage.site import Image, Site
from qlimage.trees import manifest

STAMP = ".qlimage-unpacked"


def module_tree_dir(site: Site, module: ModulePackage) -> Path:
    return site.paths.bootfiles / "cache/modules" / f"{module.package}_{module.version}"


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
    write_text(stamp, deb_stamp(module.path))
    return tree


def resolved_modules_json(image: Image, modules: Sequence[ModulePackage]) -> str:
    return (
        json.dumps(
            {
                "image": image.name,
                "flavor": image.flavor,
                "version": image.version,
                "modules": [
                    {"module": m.module, "package": m.package, "version": m.version}
                    for m in modules
                ],
            },
            indent=2,
        )
        + "\n"
    )


def stage_image(site: Site, image: Image, modules: Sequence[ModulePackage], dest: Path) -> None:
    """Build the staged tree at `dest` (replaced atomically); later modules win on conflicts."""
    trees = [unpack_module(site, m) for m in modules]
    with atomic_path(dest, directory=True) as work:
        os.chmod(work, 0o755)
        for tree in trees:
            run(["cp", "-a", "-l", "--remove-destination", f"{tree}/.", work])
        info = work / "etc/qlustar/image.json"
        info.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(info.parent, 0o755)
        info.unlink(missing_ok=True)
        info.write_text(resolved_modules_json(image, modules))
        os.chmod(info, 0o644)


def write_manifest(tree: Path, output: Path) -> None:
    write_text(output, manifest(tree))
