"""The apt hook of a head node: module packages apt installs feed the pool, images follow.

`qlimage apt-hook install` writes an apt.conf.d snippet with two hooks:

* DPkg::Pre-Install-Pkgs runs `apt-hook collect`: apt writes the .deb files it is about to
  install on its stdin. The module packages among them (`qlustar-module-*.deb`) are copied
  into the site's pool, and when that changed the pool a marker file says so. Nothing here
  may make apt fail: a bad package is reported and skipped, and the command always exits 0.
* DPkg::Post-Invoke runs `apt-hook rebuild` after each dpkg run: if the marker is there, it
  rebuilds the images (`doit run squashfs`, which runs the `stage:*` tasks it needs) under
  the build lock, removes the marker and says which images got a new generation.

Both commands carry `|| true`: a site that does not even load must not block apt either.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import qlimage
from qlimage.atomic import TMP_PREFIX, write_text
from qlimage.errors import QlimageError
from qlimage.image import publish
from qlimage.layout import Layout
from qlimage.pool.packages import PACKAGE_PREFIX, ModulePackage, module_from_control, read_control
from qlimage.site import Site

SNIPPET = "80qlimage"
DEFAULT_APT_CONF_DIR = Path("/etc/apt/apt.conf.d")
HEADER = "// Written by `qlimage apt-hook install`; remove with `qlimage apt-hook uninstall`."
PREFIX = "qlimage apt-hook"


def marker_path(site: Site) -> Path:
    """Left by collect when the pool changed; rebuild removes it once the images are built."""
    return Layout(site).apt_hook_marker


# --- the apt.conf.d snippet --------------------------------------------------------------------


def python_command() -> list[str]:
    """How apt starts this qlimage: this interpreter (a venv's, say), importing this package.

    -P keeps apt's working directory off sys.path (apt runs as root, in any directory). When the
    interpreter alone would not import this very package (a source checkout found through
    PYTHONPATH), the hook sets PYTHONPATH itself.
    """
    from qlimage.run import run

    here = Path(qlimage.__file__).resolve().parent
    probe = run(
        [sys.executable, "-P", "-c", "import qlimage; print(qlimage.__file__)"],
        cwd="/",
        unset=["PYTHONPATH", "PYTHONHOME"],
        capture=True,
        check=False,
    )
    found = probe.stdout.decode(errors="replace").strip()
    if probe.returncode == 0 and found and Path(found).resolve().parent == here:
        return [sys.executable, "-P"]
    return ["/usr/bin/env", f"PYTHONPATH={here.parent}", sys.executable, "-P"]


def hook_command(site: Site, action: str, python: Sequence[str]) -> str:
    words = [*python, "-m", "qlimage", "-C", str(site.paths.root), "apt-hook", action]
    command = " ".join(shlex.quote(w) for w in words) + " || true"
    # An apt.conf string ends at the next double quote; there is no escaping it.
    if any(c in command for c in '"\\\n\r') or not command.isprintable():
        raise QlimageError(
            f"cannot put {command!r} into an apt.conf string",
            hint="move the site or the interpreter to a path without quotes or backslashes",
        )
    return command


def snippet_text(site: Site, python: Sequence[str] | None = None) -> str:
    python = python_command() if python is None else python
    collect = hook_command(site, "collect", python)
    rebuild = hook_command(site, "rebuild", python)
    return (
        f"{HEADER}\n"
        f"// Site {site.name} ({site.paths.root}): module packages apt installs go to its pool\n"
        "// and the images using them are rebuilt.\n"
        f'DPkg::Pre-Install-Pkgs {{ "{collect}"; }};\n'
        f'DPkg::Post-Invoke {{ "{rebuild}"; }};\n'
    )


def check_conf_dir(conf_dir: Path) -> None:
    if not conf_dir.is_dir():
        raise QlimageError(f"{conf_dir}: no such directory (expected apt's apt.conf.d)")


def install(site: Site, conf_dir: Path = DEFAULT_APT_CONF_DIR) -> Path:
    """Write (or replace) the snippet atomically; return its path."""
    check_conf_dir(conf_dir)
    target = conf_dir / SNIPPET
    # atomic_path's temporary is a dot-named directory: apt's parts reader skips both.
    write_text(target, snippet_text(site), 0o644)
    return target


def uninstall(conf_dir: Path = DEFAULT_APT_CONF_DIR) -> Path | None:
    """Remove the snippet; return its path, or None when none was installed."""
    check_conf_dir(conf_dir)
    target = conf_dir / SNIPPET
    try:
        first = target.read_text().split("\n", 1)[0]
    except FileNotFoundError:
        return None
    except OSError as e:
        raise QlimageError(f"{target}: cannot read: {e.strerror}") from e
    if first != HEADER:
        raise QlimageError(f"{target}: not written by qlimage apt-hook install; left alone")
    target.unlink()
    return target


# --- collect (DPkg::Pre-Install-Pkgs) ----------------------------------------------------------


def hook_input_paths(lines: Iterable[str]) -> list[Path]:
    """The .deb files in what apt writes to a Pre-Install-Pkgs hook.

    Version 1 (the default): one file per line. Versions 2 and 3 (when
    DPkg::Tools::Options::<command>::Version is set): "VERSION n", apt's configuration up to a
    blank line, then one line per package action whose last field is the .deb file, or
    **CONFIGURE** / **REMOVE** for actions without one.
    """
    lines = [line.strip() for line in lines]
    if lines and lines[0].startswith("VERSION "):
        body = lines[lines.index("") + 1 :] if "" in lines else []
        fields = (line.split() for line in body)
        return [Path(f[-1]) for f in fields if f and f[-1].startswith("/")]
    return [Path(line) for line in lines if line]


def is_module_file(path: Path) -> bool:
    return path.name.startswith(PACKAGE_PREFIX) and path.name.endswith(".deb")


def pool_file_name(package: str, version: str, arch: str) -> str:
    """apt's own archive name: package_version_arch.deb, an epoch colon written %3a."""
    return f"{package}_{version.replace(':', '%3a')}_{arch}.deb"


@dataclass
class Collected:
    added: list[ModulePackage] = field(default_factory=list)  # new in the pool, or replaced
    present: list[ModulePackage] = field(default_factory=list)  # already there, identical
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.added)


def pool_entries(pool: Path) -> list[ModulePackage]:
    """The module packages in the pool; unreadable files are the pool's problem, not ours."""
    entries = []
    for path in sorted(pool.glob("*.deb")):
        if path.name.startswith(".") or not path.is_file():
            continue
        with contextlib.suppress(QlimageError):
            module = module_from_control(path, read_control(path))
            if module is not None:
                entries.append(module)
    return entries


def copy_atomically(source: Path, target: Path) -> None:
    """Copy `source` to `target` through a temporary in the same directory and one rename."""
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def collect(site: Site, debs: Iterable[Path]) -> Collected:
    """Copy the module packages among `debs` into the pool; mark the pool changed if it did."""
    pool = site.paths.pool
    result = Collected()
    candidates = [Path(d) for d in debs if is_module_file(Path(d))]
    if not candidates:
        return result
    try:
        pool.mkdir(parents=True, exist_ok=True)
        existing = pool_entries(pool)
    except OSError as e:
        result.errors.append(f"{pool}: cannot use the pool: {e.strerror}")
        return result
    for deb in candidates:
        try:
            control = read_control(deb)
            module = module_from_control(deb, control)
            if module is None:
                raise QlimageError(
                    f"{deb}: package {control.get('Package', '?')!r} is not a module package"
                )
            arch = control.get("Architecture", "all").strip() or "all"
            target = pool / pool_file_name(module.package, module.version, arch)
            twins = [
                m
                for m in existing
                if m.package == module.package and m.debian_version == module.debian_version
            ]
            same = next((m for m in twins if filecmp.cmp(m.path, deb, shallow=False)), None)
            if same is not None:
                result.present.append(same)
                continue
            others = [m for m in twins if m.path != target]
            if others:
                raise QlimageError(
                    f"{deb}: the pool already has {module.package} {module.version} as "
                    f"{others[0].path.name}, with other content; not adding a second copy",
                    hint="remove the one that is wrong from the pool",
                )
            copy_atomically(deb, target)
        except QlimageError as e:
            result.errors.append(str(e))
            continue
        except OSError as e:
            result.errors.append(f"{deb}: cannot copy into {pool}: {e.strerror or e}")
            continue
        added = ModulePackage(module.package, module.module, module.flavor, module.version, target)
        existing = [m for m in existing if m.path != target] + [added]
        result.added.append(added)
    if result.changed:
        # Unique content: rebuild removes the marker only if no collect rewrote it meanwhile.
        names = ", ".join(f"{m.package} {m.version}" for m in result.added)
        try:
            write_text(marker_path(site), f"{time.time_ns()} {os.getpid()}: {names}\n")
        except OSError as e:
            result.errors.append(f"{marker_path(site)}: cannot mark the pool changed: {e}")
    return result


def collect_summary(site: Site, result: Collected) -> str | None:
    """One line for apt's output; None when apt installed no module package at all."""
    parts = []
    if result.added:
        parts.append("added " + ", ".join(str(m) for m in result.added))
    if result.present:
        parts.append("already there: " + ", ".join(str(m) for m in result.present))
    if result.errors:
        parts.append(f"{len(result.errors)} package(s) skipped")
    if not parts:
        return None
    after = "; images are rebuilt after dpkg" if result.changed else ""
    return f"{PREFIX}: pool {site.paths.pool}: {'; '.join(parts)}{after}"


# --- rebuild (DPkg::Post-Invoke) ---------------------------------------------------------------


@dataclass(frozen=True)
class Rebuilt:
    status: int  # doit's exit status
    rebuilt: list[str]  # images whose current generation changed (or that got a first one)
    unchanged: list[str]


def image_generations(site: Site) -> dict[str, Path | None]:
    layout = Layout(site)
    return {name: publish.current(layout.image_root(name)) for name in sorted(site.images)}


def rebuild(site: Site, *, wait: bool = True) -> Rebuilt | None:
    """Build the images if the pool changed since; None (quickly) if it did not."""
    from qlimage.tasks.run import run_graph

    marker = marker_path(site)
    if not marker.exists():
        return None
    with publish.build_lock(site.paths.bootfiles, wait=wait):
        try:
            token = marker.read_bytes()
        except FileNotFoundError:
            return None  # a rebuild that held the lock before us did it
        before = image_generations(site)
        status = run_graph(site, ["run", "squashfs"])
        after = image_generations(site)
        if status == 0:
            with contextlib.suppress(FileNotFoundError):
                if marker.read_bytes() == token:
                    marker.unlink()
    rebuilt = [name for name in after if after[name] != before.get(name)]
    return Rebuilt(status, rebuilt, [name for name in after if name not in rebuilt])
