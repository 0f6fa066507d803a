"""Build a .deb reproducibly from a directory tree.

The same tree content always gives the same bytes: dpkg-deb sorts the archive members and,
with SOURCE_DATE_EPOCH set, clamps every tar mtime and stamps the ar members with it; we make
sure nothing that depends on the build (umask, temp directory modes, build time) leaks in.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from qlimage.atomic import TMP_PREFIX
from qlimage.run import run

REQUIRED_FIELDS = ("Package", "Version", "Architecture", "Maintainer", "Description")

# dpkg runs these, so they must be executable; every other control file is plain data.
MAINTAINER_SCRIPTS = frozenset({"preinst", "postinst", "prerm", "postrm", "config"})


def build_deb(
    tree: Path,
    control: Mapping[str, str],
    output: Path,
    *,
    source_date_epoch: int,
    root_owner_group: bool = False,
    extra_control_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Pack `tree` with `control` into `output`; return `output`.

    Raises ValueError for misuse (bad control data, DEBIAN/ in the tree) and BuildError when
    dpkg-deb rejects the package. On any failure nothing is left at `output`.
    """
    tree = Path(tree)
    output = Path(output)
    check_tree(tree, output)
    control_text = format_control(control)
    extras = dict(extra_control_files or {})
    check_extra_control_files(extras)

    output.parent.mkdir(parents=True, exist_ok=True)
    # Beside `output` so that hardlinking the tree and the final os.replace stay on one
    # filesystem; the dot prefix keeps it out of `*.deb` globs over the pool.
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{output.name}.", dir=output.parent))
    try:
        root = tmp / "root"
        link_tree(tree, root)
        write_control_dir(root / "DEBIAN", control_text, extras)
        # mkdtemp/umask decide the mode of our own directories, and the root directory
        # becomes "./" (the node's "/") in data.tar: it must not depend on the build.
        root.chmod(0o755)
        clamp_mtimes(root, source_date_epoch)
        built = tmp / "package.deb"
        run_dpkg_deb(root, built, source_date_epoch, root_owner_group)
        os.replace(built, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def check_tree(tree: Path, output: Path) -> None:
    if not tree.is_dir():
        raise ValueError(f"{tree}: not a directory")
    if (tree / "DEBIAN").exists() or (tree / "DEBIAN").is_symlink():
        raise ValueError(f"{tree}: must not contain DEBIAN/, pass the control data instead")
    # The temporary build directory goes beside `output`; inside the tree it would copy itself.
    if output.parent.resolve().is_relative_to(tree.resolve()):
        raise ValueError(f"{output}: must not be inside the package tree {tree}")


def format_control(control: Mapping[str, str]) -> str:
    """Render the control paragraph, fields in the given order, multi-line values folded."""
    missing = [f for f in REQUIRED_FIELDS if not str(control.get(f, "")).strip()]
    if missing:
        raise ValueError(f"control data lacks required field(s): {', '.join(missing)}")
    lines = []
    for name, value in control.items():
        check_field_name(name)
        lines.append(format_field(name, str(value)))
    return "\n".join(lines) + "\n"


def check_field_name(name: str) -> None:
    if not name or name.startswith(("#", "-")) or any(c in name for c in ": \t\n"):
        raise ValueError(f"invalid control field name {name!r}")


def format_field(name: str, value: str) -> str:
    """One field; continuation lines start with a space and empty ones are written " "."""
    first, *rest = value.strip("\n").split("\n")
    folded = [f"{name}: {first.strip()}"]
    for line in rest:
        if not line.strip():
            folded.append(" .")
        elif line.startswith((" ", "\t")):
            folded.append(line.rstrip())
        else:
            folded.append(" " + line.rstrip())
    return "\n".join(folded)


def check_extra_control_files(extras: Mapping[str, bytes]) -> None:
    for name in extras:
        if not name or "/" in name or name in (".", "..", "control"):
            raise ValueError(f"invalid extra control file name {name!r}")


def link_tree(tree: Path, root: Path) -> None:
    """Mirror `tree` at `root` without copying file contents where the filesystem allows."""
    # Directories and symlinks are always created afresh (they are ours to modify); regular
    # files share their inode with the source tree unless hardlinking is refused.
    shutil.copytree(tree, root, symlinks=True, copy_function=link_or_copy)


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        # EXDEV (tree on another filesystem), EPERM (protected_hardlinks), EMLINK, ...
        shutil.copy2(src, dst, follow_symlinks=False)


def write_control_dir(debian: Path, control_text: str, extras: Mapping[str, bytes]) -> None:
    debian.mkdir()
    # Explicit modes: the umask must not reach control.tar (and dpkg-deb rejects a control
    # directory outside 0755..0775).
    debian.chmod(0o755)
    write_file(debian / "control", control_text.encode(), 0o644)
    for name in sorted(extras):
        write_file(debian / name, extras[name], 0o755 if name in MAINTAINER_SCRIPTS else 0o644)


def write_file(path: Path, data: bytes, mode: int) -> None:
    path.write_bytes(data)
    path.chmod(mode)


def clamp_mtimes(root: Path, epoch: int) -> None:
    """Lower every mtime we own under `root` to `epoch`.

    Hardlinked regular files (st_nlink > 1) are deliberately skipped: their inode is shared
    with the caller's tree and touching it would silently rewrite the source's timestamps.
    That is safe because dpkg-deb passes --clamp-mtime to tar whenever SOURCE_DATE_EPOCH is
    set, so the archive gets the clamped value anyway; this pass covers what we created
    (directories, symlinks, DEBIAN/, fallback copies) so the tree is consistent on its own.
    """
    clamp_mtime(root, epoch)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                continue
            clamp_mtime(path, epoch, st)


def clamp_mtime(path: Path, epoch: int, st: os.stat_result | None = None) -> None:
    st = st or path.lstat()
    if st.st_mtime_ns > epoch * 1_000_000_000:
        os.utime(path, ns=(st.st_atime_ns, epoch * 1_000_000_000), follow_symlinks=False)


def run_dpkg_deb(root: Path, built: Path, epoch: int, root_owner_group: bool) -> None:
    cmd: list[str | os.PathLike[str]] = ["dpkg-deb", "--build", "-Zgzip", "-z9"]
    if root_owner_group:
        cmd.append("--root-owner-group")
    cmd += [root, built]
    # capture: dpkg-deb announces "building package ..." on stdout, which is noise for us.
    run(cmd, env={"SOURCE_DATE_EPOCH": str(epoch)}, capture=True)
