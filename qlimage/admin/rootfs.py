"""Root FS Customization configs: the directories `rootfs/<config>/` whose files the runner puts
on the nodes that name the config in their `rootfs` option (the seed's QluMan window: New,
Delete; `qlustar-image-edit -r` edits their files through admin/editor.py)."""

from __future__ import annotations

import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qlimage.admin.editor import DIR_MODE, INIT_D, Outcome, Tree, rebuild, require_real_dir
from qlimage.atomic import TMP_PREFIX
from qlimage.errors import QlimageError
from qlimage.image.publish import build_lock
from qlimage.site import Site
from qlimage.trees import remove_in_root, walk

# The name pattern of nodes.schema.json's `rootfs` items: a config name is a node option value.
# Matched whole (fullmatch): `$` alone would let a trailing newline through.
NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
NAME_EXPECTED = "a name of lower-case letters, digits, '.', '_', '-'"


@dataclass(frozen=True)
class Config:
    name: str
    path: Path
    nodes: tuple[str, ...]  # the hosts whose rootfs option names it


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise QlimageError(f"Root FS Customization config {name!r}: expected {NAME_EXPECTED}")
    return name


def config_names(site: Site) -> list[str]:
    """The configs present: the real directories of rootfs/ with a valid name (a temporary
    directory of a deletion in progress, `.qlimage-tmp.*`, is none)."""
    top = site.paths.rootfs
    if not top.is_dir():
        return []
    return sorted(
        e.name
        for e in os.scandir(top)
        if NAME.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
    )


def users(site: Site, name: str) -> list[str]:
    """The hosts whose effective rootfs option names the config, each with where it came from."""
    return [
        f"{h.name} ({h.option_sources.get('rootfs', 'options')})"
        for h in site.hosts
        if name in h.options.get("rootfs", ())
    ]


def list_configs(site: Site) -> list[Config]:
    return [
        Config(
            n,
            site.paths.rootfs / n,
            tuple(h.name for h in site.hosts if n in h.options.get("rootfs", ())),
        )
        for n in config_names(site)
    ]


def known_config(site: Site, name: str) -> Path:
    """rootfs/<name>, which must exist as a real directory."""
    check_name(name)
    path = site.paths.rootfs / name
    require_real_dir(path, "a Root FS Customization config")
    if not path.is_dir():
        known = ", ".join(config_names(site)) or "none"
        raise QlimageError(
            f"no Root FS Customization config {name!r} under {site.paths.rootfs} (known: {known})",
            hint=f"create it with: qlimage rootfs new {name}",
        )
    return path


def config_tree(site: Site, name: str) -> Tree:
    return Tree(known_config(site, name), f"rootfs/{name}")


def file_count(path: Path) -> int:
    return sum(1 for p in walk(path) if not stat.S_ISDIR(p.lstat().st_mode))


def create(site: Site, name: str, *, wait: bool, build: bool) -> Outcome:
    """rootfs/<name>/ with an empty lib/qlustar/init.d/ for its scripts (all 0755), then the
    rebuild (with `build`)."""
    check_name(name)
    path = site.paths.rootfs / name
    with build_lock(site.paths.bootfiles, wait=wait):
        if os.path.lexists(path):
            raise QlimageError(f"Root FS Customization config {name!r} exists: {path}")
        require_real_dir(site.paths.rootfs, "the rootfs directory")
        site.paths.rootfs.mkdir(mode=DIR_MODE, exist_ok=True)
        # Built aside and renamed in: a config is either absent or complete.
        work = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}rootfs.", dir=site.paths.rootfs))
        try:
            os.chmod(work, DIR_MODE)  # mkdtemp's is 0700
            d = work
            for part in INIT_D.strip("/").split("/"):
                d = d / part
                d.mkdir(mode=DIR_MODE)
                os.chmod(d, DIR_MODE)  # independent of the umask
            os.rename(work, path)
        except BaseException:
            remove_in_root(work)
            raise
        status = rebuild(site, wait=wait) if build else None
    return Outcome(path, True, status)


def delete(site: Site, name: str, *, wait: bool, build: bool) -> Outcome:
    """Remove rootfs/<name>/ and everything below it, then rebuild (with `build`); refused
    while a node uses it. The caller has asked for the confirmation."""
    with build_lock(site.paths.bootfiles, wait=wait):
        path = known_config(site, name)
        check_unused(site, name)
        # Renamed away first: a deletion killed half-way leaves no half config that nodes get.
        doomed = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}delete.", dir=path.parent))
        os.rename(path, doomed / name)
        remove_in_root(doomed)
        status = rebuild(site, wait=wait) if build else None
    return Outcome(path, True, status)


def check_unused(site: Site, name: str) -> None:
    used_by = users(site, name)
    if used_by:
        raise QlimageError(
            f"Root FS Customization config {name!r} is used by "
            + ", ".join(used_by)
            + "; remove it from their rootfs option first"
        )
