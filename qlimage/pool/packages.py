"""Module packages in a pool directory, and picking a version for a requested (meta-)version.

A module is a Debian package named `qlustar-module-<module>-<flavor>` (the module name may
contain dashes; the flavor is the last dash-separated part). The control fields
`Qlustar-Module` and `Qlustar-Flavor`, when present, win over what the name says.
"""

from __future__ import annotations

import hashlib
import json
import stat
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from debian.debian_support import Version

from qlimage.atomic import write_text
from qlimage.errors import ConfigError, QlimageError

PACKAGE_PREFIX = "qlustar-module-"
MODULE_FIELD = "Qlustar-Module"
FLAVOR_FIELD = "Qlustar-Flavor"
# Requests with at most this many components are meta-versions ("11", "11.0").
META_COMPONENTS = 2


@dataclass(frozen=True)
class ModulePackage:
    package: str  # full Debian package name
    module: str  # e.g. "core"
    flavor: str  # e.g. "bookworm"
    version: str  # Debian version string
    path: Path  # the .deb

    @property
    def debian_version(self) -> Version:
        return Version(self.version)

    def sort_key(self) -> tuple[str, str, Version, str]:
        """(module, flavor, Debian version order, file name): the pool's listing order."""
        return (self.module, self.flavor, self.debian_version, self.path.name)

    def __str__(self) -> str:
        return f"{self.module} {self.version} ({self.flavor})"


# --- reading packages --------------------------------------------------------------------

# Control paragraphs keyed by (path, inode, size, mtime_ns, ctime_ns): a pool is rescanned for
# every image build, and a .deb that has not changed on disk has not changed its control data
# either. Size and mtime alone are not enough: a same-length rewrite can set its mtime back
# (os.utime, cp -p, tar), but not its ctime, and a file renamed over it has another inode.
_control_cache: dict[tuple[str, int, int, int, int], dict[str, str]] = {}


def read_module(path: Path) -> ModulePackage:
    """The module package at `path`; QlimageError naming the file if it is not one."""
    path = Path(path)
    control = read_control(path)
    module = module_from_control(path, control)
    if module is None:
        raise QlimageError(
            f"{path}: package {control.get('Package', '?')!r} is not a module package",
            hint=f"module packages are named {PACKAGE_PREFIX}<module>-<flavor>",
        )
    return module


def scan_pool(directory: Path) -> list[ModulePackage]:
    """Every module package in `directory` (not recursive), in (module, flavor, version) order.

    A missing directory is an empty pool; .deb files that are not module packages are
    ignored; a .deb that cannot be read at all is an error, since it is likely a broken
    download the admin should know about.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    modules = []
    for path in sorted(directory.glob("*.deb")):
        # Dot names are other tools' work in progress (build_deb's temporary directories).
        if path.name.startswith(".") or not path.is_file():
            continue
        module = module_from_control(path, read_control(path))
        if module is not None:
            modules.append(module)
    return sorted(modules, key=ModulePackage.sort_key)


def read_control(path: Path) -> dict[str, str]:
    """The control paragraph of the .deb at `path` (only the control member is read)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise QlimageError(f"{path}: cannot read package: {exc.strerror}") from exc
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    cached = _control_cache.get(key)
    if cached is None:
        cached = _control_cache[key] = parse_control(path)
    return dict(cached)


def load_control_cache(path: Path) -> None:
    """Seed the control cache and the checked archives from a file written by
    save_control_cache (a no-op build then reads no .deb at all); an unreadable file is
    ignored."""
    try:
        doc = json.loads(path.read_text())
        for name, ino, size, mtime_ns, ctime_ns, control in doc["control"]:
            _control_cache.setdefault((name, ino, size, mtime_ns, ctime_ns), control)
        for name, ino, size, mtime_ns, ctime_ns in doc["archives"]:
            _checked_archives.add((name, ino, size, mtime_ns, ctime_ns))
    except (OSError, ValueError, TypeError, KeyError):
        pass


def save_control_cache(path: Path) -> None:
    doc = {
        "control": sorted(
            [name, ino, size, mtime, ctime, control]
            for (name, ino, size, mtime, ctime), control in _control_cache.items()
            if Path(name).exists()
        ),
        "archives": sorted(list(key) for key in _checked_archives if Path(key[0]).exists()),
    }
    text = json.dumps(doc, sort_keys=True)
    try:
        if path.exists() and path.read_text() == text:
            return
        write_text(path, text)
    except OSError:
        pass  # only a speed-up


def parse_control(path: Path) -> dict[str, str]:
    try:
        from debian.debfile import DebFile  # slow to import; only when a .deb is read

        with DebFile(path) as deb:
            control = dict(deb.debcontrol())
    except Exception as exc:  # python-debian raises anything from ArError to zlib.error
        raise QlimageError(f"{path}: not a readable .deb package: {exc}") from exc
    names = {name.lower() for name, value in control.items() if value.strip()}
    if not {"package", "version"} <= names:
        raise QlimageError(f"{path}: control data lacks Package or Version")
    return control


def module_from_control(path: Path, control: Mapping[str, str]) -> ModulePackage | None:
    """Module, flavor and version from the control fields, or None for a non-module .deb."""
    # Control field names are case-insensitive (Debian Policy 5.1).
    fields = {name.lower(): value.strip() for name, value in control.items()}
    package = fields["package"]
    names = split_package_name(package, fields.get(FLAVOR_FIELD.lower()))
    module = fields.get(MODULE_FIELD.lower()) or (names[0] if names else None)
    flavor = fields.get(FLAVOR_FIELD.lower()) or (names[1] if names else None)
    if not module or not flavor:
        return None
    check_version(path, fields["version"])
    return ModulePackage(
        package=package, module=module, flavor=flavor, version=fields["version"], path=path
    )


def check_version(path: Path, version: str) -> None:
    # Checked once here so that sorting and resolving never trip over a bad version later.
    try:
        Version(version)
    except ValueError as exc:
        raise QlimageError(f"{path}: invalid package version {version!r}") from exc


def split_package_name(package: str, flavor: str | None = None) -> tuple[str, str] | None:
    """("slurm-client", "bookworm") for qlustar-module-slurm-client-bookworm, else None."""
    if not package.startswith(PACKAGE_PREFIX):
        return None
    rest = package[len(PACKAGE_PREFIX) :]
    # A flavor given in the control data tells where the module name ends even if the
    # flavor itself contained a dash.
    if flavor and rest.endswith("-" + flavor) and len(rest) > len(flavor) + 1:
        return rest[: -len(flavor) - 1], flavor
    module, sep, flavor_part = rest.rpartition("-")
    if not sep or not module or not flavor_part:
        return None
    return module, flavor_part


# --- version selection -------------------------------------------------------------------


def version_matches(requested: str, version: str) -> bool:
    """Whether `version` satisfies `requested` ("11", "11.0" meta-versions or "11.0.0" exact).

    Upstream versions are compared whole components at a time, so "11" matches 11.y.z but
    neither 110.0 nor 1.1. A request with more than two components is exact: "11.0.0"
    matches 11.0.0 and 11.0.0-N only. An epoch or Debian revision in `requested` must match
    exactly; when left out, any epoch or revision of `version` is accepted.
    """
    if not requested.strip():
        raise ValueError("empty version request")
    req_epoch, req_upstream, req_revision = split_version(requested.strip())
    epoch, upstream, revision = split_version(version)
    if req_epoch is not None and int(req_epoch) != int(epoch or 0):
        return False
    if req_revision is not None and req_revision != revision:
        return False
    wanted = req_upstream.split(".")
    have = upstream.split(".")
    if len(wanted) > META_COMPONENTS:
        # An exact request: 11.0.0 must not also pick up an 11.0.0.1.
        return len(have) == len(wanted) and all(map(same_component, wanted, have))
    return len(have) >= len(wanted) and all(map(same_component, wanted, have))


def split_version(version: str) -> tuple[str | None, str, str | None]:
    """(epoch, upstream, revision) of a Debian version; absent parts are None."""
    head, sep, rest = version.partition(":")
    epoch = head if sep and is_number(head) else None
    if epoch is None:
        rest = version
    upstream, sep, revision = rest.rpartition("-")
    if not sep:
        return epoch, rest, None
    return epoch, upstream, revision


def is_number(component: str) -> bool:
    return component.isascii() and component.isdigit()


def same_component(wanted: str, have: str) -> bool:
    # Debian ordering treats "01" and "1" as equal, so a request should too.
    if is_number(wanted) and is_number(have):
        return int(wanted) == int(have)
    return wanted == have


def resolve(
    pool: Sequence[ModulePackage], module: str, flavor: str, requested: str
) -> ModulePackage:
    """The newest pool entry for `module`/`flavor` whose version matches `requested`."""
    candidates = [m for m in pool if m.module == module and m.flavor == flavor]
    if not candidates:
        raise unknown_module_error(pool, module, flavor, requested)
    matching = [m for m in candidates if version_matches(requested, m.version)]
    if not matching:
        raise QlimageError(
            f"module {module} ({flavor}): no version matches {requested!r}; "
            f"the pool has {', '.join(versions_of(candidates))}",
        )
    best = max(matching, key=lambda m: m.debian_version)
    check_unambiguous(best, matching)
    return best


def unknown_module_error(
    pool: Sequence[ModulePackage], module: str, flavor: str, requested: str
) -> QlimageError:
    wanted = f"module {module} {requested} ({flavor})"
    known = sorted({m.module for m in pool if m.flavor == flavor})
    if known:
        return QlimageError(f"{wanted}: not in the pool; modules for {flavor}: {', '.join(known)}")
    flavors = sorted({m.flavor for m in pool})
    if flavors:
        return QlimageError(
            f"{wanted}: the pool has no modules for flavor {flavor}; flavors: {', '.join(flavors)}"
        )
    return QlimageError(f"{wanted}: the module pool is empty")


def versions_of(modules: Iterable[ModulePackage]) -> list[str]:
    """Distinct versions, oldest first."""
    unique = {m.version: m.debian_version for m in modules}
    return sorted(unique, key=lambda v: unique[v])


def check_unambiguous(best: ModulePackage, matching: Sequence[ModulePackage]) -> None:
    # Two files claiming the same module version (a renamed copy, a package carrying
    # Qlustar-Module fields) would make the image depend on directory order.
    twins = [m for m in matching if m.debian_version == best.debian_version]
    if len(twins) > 1:
        files = ", ".join(sorted(str(m.path) for m in twins))
        raise QlimageError(
            f"module {best.module} {best.version} ({best.flavor}) is in the pool twice: {files}",
            hint="remove all but one of these files",
        )


# --- package contents --------------------------------------------------------------------


def module_files(path: Path) -> list[tuple[str, int, str]]:
    """The file tree of the module at `path`, sorted by path.

    Each entry is (path without "./", st_mode-style mode including the file type bits,
    detail): the sha256 hex of the content for regular files (hardlinks: of the linked
    content), the target for symlinks, "" for directories, "c:MAJOR:MINOR"/"b:MAJOR:MINOR"
    for device nodes and "" for fifos. The archive root itself is left out.
    """
    path = Path(path)
    try:
        from debian.debfile import DebFile  # slow to import; only when a .deb is read

        with DebFile(path) as deb:
            tar = deb.data.tgz()
            entries = [file_entry(tar, member) for member in tar]
    except QlimageError:
        raise
    except Exception as exc:  # see parse_control
        raise QlimageError(f"{path}: cannot read package contents: {exc}") from exc
    return sorted(e for e in entries if e[0])


def file_entry(tar: tarfile.TarFile, member: tarfile.TarInfo) -> tuple[str, int, str]:
    name = normalize_member_name(member.name)
    mode = file_type_bits(member) | (member.mode & 0o7777)
    if member.issym():
        return name, mode, member.linkname
    if member.isfile() or member.islnk():
        return name, mode, sha256_member(tar, member)
    if member.ischr() or member.isblk():
        return name, mode, f"{'c' if member.ischr() else 'b'}:{member.devmajor}:{member.devminor}"
    return name, mode, ""


def normalize_member_name(name: str) -> str:
    name = str(name)
    while name.startswith("./"):
        name = name[2:]
    return "" if name in (".", "") else name.rstrip("/")


def file_type_bits(member: tarfile.TarInfo) -> int:
    if member.isdir():
        return stat.S_IFDIR
    if member.issym():
        return stat.S_IFLNK
    if member.ischr():
        return stat.S_IFCHR
    if member.isblk():
        return stat.S_IFBLK
    if member.isfifo():
        return stat.S_IFIFO
    return stat.S_IFREG  # regular files and hardlinks to them


def sha256_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    fileobj = tar.extractfile(member)
    if fileobj is None:
        raise QlimageError(f"{member.name}: content missing from the package archive")
    digest = hashlib.sha256()
    with fileobj:
        for chunk in iter(lambda: fileobj.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- archive safety: checked before any task, so unpacking never leaves the module's tree -----

# .debs whose data archive passed check_module_archive, by (path, inode, size, mtime_ns,
# ctime_ns): a replaced or rewritten file changes its ctime, which no tool can set back.
_checked_archives: set[tuple[str, int, int, int, int]] = set()


def archive_key(path: Path) -> tuple[str, int, int, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def check_module_archive(path: Path) -> None:
    """QlimageError naming the package file and the member if the .deb's data archive could
    make an unpacker leave its tree: a member named by an absolute path or with `..`, a hard
    link to such a path or to a member that is not (yet) in the archive, or a member below a
    symlink member; or if the archive cannot be read to its end (truncated, corrupt)."""
    path = Path(path)
    try:
        key = archive_key(path)
    except OSError as exc:
        raise QlimageError(f"{path}: cannot read package: {exc.strerror}") from exc
    if key in _checked_archives:
        return
    try:
        from debian.debfile import DebFile  # slow to import; only when a .deb is read

        with DebFile(path) as deb:
            tar = deb.data.tgz()
            check_members(path, tar)
    except QlimageError:
        raise
    except Exception as exc:  # see parse_control
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise QlimageError(f"{path}: not a readable .deb package: {reason}") from exc
    _checked_archives.add(key)


def check_members(path: Path, tar: tarfile.TarFile) -> None:
    seen: set[str] = set()
    links: set[str] = set()  # symlink members: nothing may be unpacked below one
    for member in tar:
        name = member_problem_name(path, member.name, "member")
        if member.islnk():
            target = member_problem_name(path, member.linkname, f"hard link {member.name!r} to")
            if target not in seen or target in links:
                raise QlimageError(
                    f"{path}: member {member.name!r}: hard link to {member.linkname!r}, "
                    "which is not a file earlier in the package"
                )
        for parent in Path(name).parents:
            if str(parent) in links:
                raise QlimageError(
                    f"{path}: member {member.name!r} lies below the symlink member "
                    f"{parent.as_posix()!r}: unpacking it would follow the link"
                )
        if member.issym():
            if not name:
                raise QlimageError(f"{path}: member {member.name!r}: the package root is a link")
            links.add(name)
        elif member.isfile() or member.islnk():
            read_to_end(tar, member)  # a truncated archive fails here, not while unpacking
        seen.add(name)


def member_problem_name(path: Path, raw: str, what: str) -> str:
    """The member name without "./"; QlimageError if it is absolute or has `..`."""
    if raw.startswith("/") or ".." in raw.split("/"):
        raise QlimageError(
            f"{path}: {what} {raw!r}: an absolute path or '..' would leave the package tree"
        )
    return normalize_member_name(raw)


def read_to_end(tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
    fileobj = tar.extractfile(member)
    if fileobj is not None:
        with fileobj:
            while fileobj.read(1 << 20):
                pass


def check_module_archives(modules: Iterable[ModulePackage], cache: Path | None) -> None:
    """check_module_archive for every module .deb that exists (a recipe's is built later);
    every bad package is reported, each on its line. The checked ones are remembered in the
    pool cache file (`cache`), so a no-op build reads no archive."""
    problems = []
    before = len(_checked_archives)
    for path in sorted({m.path for m in modules if m.path.exists()}):
        try:
            check_module_archive(path)
        except QlimageError as e:
            problems.append(str(e))
    if cache is not None and len(_checked_archives) != before:
        save_control_cache(cache)
    if problems:
        raise ConfigError(problems)


def module_changelog(path: Path) -> str | None:
    """The Debian changelog the module ships (usr/share/doc/<package>/), or None."""
    path = Path(path)
    try:
        from debian.debfile import DebFile  # slow to import; only when a .deb is read

        with DebFile(path) as deb:
            changelog = deb.changelog()
    except Exception as exc:  # see parse_control
        raise QlimageError(f"{path}: cannot read the package changelog: {exc}") from exc
    return None if changelog is None else str(changelog)
