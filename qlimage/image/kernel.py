"""The node kernel: taken from a Debian kernel package, unpacked once, with modules.dep built.

Debian's kernel packages ship no modules.dep (their postinst runs depmod), so we run
`depmod -b` on the unpacked tree: the initrd picks its modules' dependencies from it.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qlimage.atomic import TMP_PREFIX, atomic_path
from qlimage.errors import BuildError
from qlimage.layout import KERNEL_INFO
from qlimage.pool.packages import read_control
from qlimage.progress import reading
from qlimage.run import run
from qlimage.site import Site
from qlimage.trees import file_digest

REAL_KERNEL = re.compile(r"^linux-image-\d")


@dataclass(frozen=True)
class Kernel:
    kver: str  # e.g. 6.1.0-56-amd64
    package: str
    version: str
    vmlinuz: Path
    modules: Path  # .../lib/modules/<kver>


def kernel_deb(site: Site) -> Path:
    """The kernel .deb to use: site.toml's local `kernel.deb`, else the archive's newest.

    A metapackage such as linux-image-amd64 is followed to the versioned package it depends on.
    """
    if site.kernel_deb is not None:
        return site.kernel_deb
    from qlimage.pool.mirror import open_archive  # the archive client pulls in requests

    archive = open_archive(site)
    pkg = archive.package(site.kernel_package)
    if not REAL_KERNEL.match(pkg.name):
        target = next(
            (d.strip().split()[0] for d in pkg.depends.split(",") if REAL_KERNEL.match(d.strip())),
            None,
        )
        if target is None:
            raise BuildError(
                f"{pkg.name} {pkg.version} depends on no linux-image-<version> package"
            )
        pkg = archive.package(target)
    return archive.download(pkg)


def unpack_kernel(deb: Path, dest: Path) -> Kernel:
    """Unpack `deb` into `dest` (replaced atomically) and describe it in kernel.json."""
    control = read_control(deb)
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX + "unpack.", dir=dest.parent) as tmp:
        with reading(deb, f"unpack {deb.name}") as tick:  # ~70 MB of xz: seconds
            run(["dpkg-deb", "-x", deb, tmp], on_tick=tick)
        images = sorted(Path(tmp, "boot").glob("vmlinuz-*"))
        if not images:
            raise BuildError(f"{deb.name}: no /boot/vmlinuz-* in this package")
        kver = images[0].name.removeprefix("vmlinuz-")
        run(["depmod", "-b", tmp, kver])
        with atomic_path(dest, directory=True) as work:
            shutil.move(images[0], work / "vmlinuz")
            shutil.move(Path(tmp, "lib/modules", kver), work / "modules")
            info = {
                "kver": kver,
                "package": control["Package"],
                "version": control["Version"],
                "deb_sha256": file_digest(deb),
                "vmlinuz_sha256": file_digest(work / "vmlinuz"),
            }
            (work / KERNEL_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return read_kernel(dest)


def read_kernel(dest: Path) -> Kernel:
    info = json.loads((dest / KERNEL_INFO).read_text())
    return Kernel(
        info["kver"], info["package"], info["version"], dest / "vmlinuz", dest / "modules"
    )
