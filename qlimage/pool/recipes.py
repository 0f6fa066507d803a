"""Build image-module packages from recipes: Debian packages plus files of our own.

A module package carries a plain file tree (packages unpacked, maintainer scripts not run) and
`usr/share/qlustar/modules/<module>.packages`, the packages and versions it is made of, which the
image changelogs are computed from.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from qlimage.atomic import TMP_PREFIX
from qlimage.errors import BuildError
from qlimage.image.publish import fault_point
from qlimage.pool.debpack import build_deb
from qlimage.run import run
from qlimage.site import Recipe, Site
from qlimage.trees import walk

if TYPE_CHECKING:
    from qlimage.pool.archive import BinaryPackage

PACKAGES_LIST = "usr/share/qlustar/modules/{module}.packages"


def recipe_output(site: Site, recipe: Recipe) -> Path:
    return site.paths.pool / recipe.deb_name(site.archive.arch)


def unpack_packages(debs: list[tuple[BinaryPackage, Path]], tree: Path) -> None:
    # dpkg-deb -x as root keeps every owner and mode the package declares.
    for _pkg, deb in debs:
        run(["dpkg-deb", "-x", deb, tree])


def add_files(recipe: Recipe, tree: Path) -> None:
    """Our own files (recipe's files/) win over what the Debian packages put there."""
    files = recipe.directory / "files"
    if files.is_dir():
        copy_checkout_tree(files, tree)
    changelog = recipe.directory / "changelog"
    if changelog.exists():
        doc = tree / "usr/share/doc" / recipe.package
        doc.mkdir(parents=True, exist_ok=True)
        data = gzip.compress(changelog.read_bytes(), compresslevel=9, mtime=0)
        (doc / "changelog.gz").write_bytes(data)


def copy_checkout_tree(src: Path, dst: Path) -> None:
    """Copy a tree from a git checkout: root-owned, 0755 or 0644 by the executable bit only.

    git records nothing but the executable bit, and the checkout applied the umask of the day;
    normalising here makes two checkouts give the same module bytes.
    """
    for path in walk(src):
        target = dst / path.relative_to(src)
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            target.unlink()
        if path.is_symlink():
            os.symlink(os.readlink(path), target)
        elif path.is_dir():
            target.mkdir(exist_ok=True)
            os.chmod(target, 0o755)
        else:
            shutil.copyfile(path, target)
            os.chmod(target, 0o755 if path.stat().st_mode & 0o100 else 0o644)
        os.lchown(target, 0, 0)


def add_busybox_links(tree: Path) -> None:
    """A link for each applet busybox reports, where the packages left the path free."""
    busybox = tree / "bin/busybox"
    if not busybox.exists():
        raise BuildError("busybox_links = true but the recipe's packages ship no /bin/busybox")
    # The binary is static and for our architecture, so it can tell its own applet list.
    applets = run([busybox, "--list-full"], capture=True).stdout.decode().split()
    for applet in sorted(applets):
        link = tree / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(busybox, link.parent), link)


def write_packages_list(recipe: Recipe, debs: list[tuple[BinaryPackage, Path]], tree: Path) -> None:
    path = tree / PACKAGES_LIST.format(module=recipe.module)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(f"{p.name} {p.version}\n" for p, _ in sorted(debs, key=lambda d: d[0].name))
    )


def temporary_prefix(recipe: Recipe) -> str:
    return f"{TMP_PREFIX}module.{recipe.module}."


def remove_temporaries(site: Site, recipe: Recipe) -> list[Path]:
    """What a killed build of this recipe left in the pool: its tree and build_deb's temporary.
    Only this recipe's: doit may build other modules beside it at the same time, and a build
    killed in this recipe makes the next build run this recipe again."""
    output = recipe_output(site, recipe)
    prefixes = (temporary_prefix(recipe), f"{TMP_PREFIX}{output.name}.")
    stale = [
        p
        for p in output.parent.iterdir()
        if p.name.startswith(prefixes) and p.is_dir() and not p.is_symlink()
    ]
    for path in stale:
        shutil.rmtree(path)
    return stale


def build_module(site: Site, recipe: Recipe) -> Path:
    """Fetch the recipe's packages (cached, SHA256-checked) and build the module .deb."""
    from qlimage.pool.mirror import open_archive  # the archive client pulls in requests

    archive = open_archive(site)
    closure = archive.closure(recipe.packages, exclude=recipe.exclude)
    # One progress line for the closure (bytes and packages), not one per package.
    debs = list(zip(closure, archive.download_all(closure), strict=True))
    output = recipe_output(site, recipe)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_temporaries(site, recipe)
    with tempfile.TemporaryDirectory(prefix=temporary_prefix(recipe), dir=output.parent) as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        os.chmod(tree, 0o755)
        unpack_packages(debs, tree)
        fault_point("module-unpacked")
        add_files(recipe, tree)
        if recipe.busybox_links:
            add_busybox_links(tree)
        write_packages_list(recipe, debs, tree)
        build_deb(
            tree,
            {
                "Package": recipe.package,
                "Version": recipe.version,
                "Architecture": site.archive.arch,
                "Maintainer": "qlimage <qlimage@localhost>",
                "Description": recipe.description,
                "Qlustar-Module": recipe.module,
                "Qlustar-Flavor": recipe.flavor,
                "Built-Using": ", ".join(f"{p.name} (= {p.version})" for p, _ in debs),
            },
            output,
            source_date_epoch=site.source_date_epoch,
        )
    return output
