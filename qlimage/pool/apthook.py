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

import argparse
import contextlib
import filecmp
import os
import shlex
import subprocess
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
from qlimage.pool.packages import PACKAGE_PREFIX, ModulePackage, module_from_control, read_control
from qlimage.site import Site

SNIPPET = "80qlimage"
DEFAULT_APT_CONF_DIR = Path("/etc/apt/apt.conf.d")
MARKER = ".apt-hook-pending"  # in the site's bootfiles: the pool changed, images are not built
HEADER = "// Written by `qlimage apt-hook install`; remove with `qlimage apt-hook uninstall`."
PREFIX = "qlimage apt-hook"


def marker_path(site: Site) -> Path:
    return site.paths.bootfiles / MARKER


# --- the apt.conf.d snippet --------------------------------------------------------------------


def python_command() -> list[str]:
    """How apt starts this qlimage: this interpreter (a venv's, say), importing this package.

    -P keeps apt's working directory off sys.path (apt runs as root, in any directory). When the
    interpreter alone would not import this very package (a source checkout found through
    PYTHONPATH), the hook sets PYTHONPATH itself.
    """
    here = Path(qlimage.__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    probe = subprocess.run(
        [sys.executable, "-P", "-c", "import qlimage; print(qlimage.__file__)"],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    found = probe.stdout.strip()
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
    from qlimage.layout import Layout

    layout = Layout(site)
    return {name: publish.current(layout.image_root(name)) for name in sorted(site.images)}


def rebuild(site: Site, *, wait: bool = True) -> Rebuilt | None:
    """Build the images if the pool changed since; None (quickly) if it did not."""
    from qlimage.cli import run_doit  # cli imports this module to register the command

    marker = marker_path(site)
    if not marker.exists():
        return None
    with publish.build_lock(site.paths.bootfiles, wait=wait):
        try:
            token = marker.read_bytes()
        except FileNotFoundError:
            return None  # a rebuild that held the lock before us did it
        before = image_generations(site)
        status = run_doit(site, ["run", "squashfs"])
        after = image_generations(site)
        if status == 0:
            with contextlib.suppress(FileNotFoundError):
                if marker.read_bytes() == token:
                    marker.unlink()
    rebuilt = [name for name in after if after[name] != before.get(name)]
    return Rebuilt(status, rebuilt, [name for name in after if name not in rebuilt])


# --- the command line --------------------------------------------------------------------------


def cmd_install(site: Site, args: argparse.Namespace) -> int:
    path = install(site, args.apt_conf_dir)
    print(f"{PREFIX}: wrote {path}: apt now feeds {site.paths.pool} and rebuilds the images")
    return 0


def cmd_uninstall(site: Site, args: argparse.Namespace) -> int:
    path = uninstall(args.apt_conf_dir)
    if path is None:
        print(f"{PREFIX}: no {args.apt_conf_dir / SNIPPET}: nothing to remove")
    else:
        print(f"{PREFIX}: removed {path}")
    return 0


def read_hook_input(args: argparse.Namespace) -> list[Path]:
    if args.debs:
        return list(args.debs)
    if sys.stdin is None or sys.stdin.isatty():
        raise QlimageError(
            "collect reads apt's list of .deb files from stdin",
            hint="give the .deb files as arguments to collect them by hand",
        )
    return hook_input_paths(sys.stdin.read().splitlines())


def cmd_collect(site: Site, args: argparse.Namespace) -> int:
    """Always 0: apt aborts the whole installation when a Pre-Install-Pkgs hook fails."""
    try:
        result = collect(site, read_hook_input(args))
    except Exception as e:  # anything at all: report it and let apt go on
        print(f"{PREFIX} collect: {e}", file=sys.stderr)
        return 0
    for error in result.errors:
        print(f"{PREFIX} collect: {error}", file=sys.stderr)
    summary = collect_summary(site, result)
    if summary:
        print(summary, file=sys.stderr)
    return 0


def cmd_rebuild(site: Site, args: argparse.Namespace) -> int:
    try:
        result = rebuild(site, wait=not args.no_wait)
    except QlimageError as e:
        raise QlimageError(
            f"apt-hook rebuild: {e}",
            hint=f"the pool change stays pending; fix this, then run "
            f"`qlimage -C {site.paths.root} apt-hook rebuild` (or any apt run does it)",
        ) from e
    if result is None:
        return 0
    sys.stdout.flush()
    rebuilt = ", ".join(result.rebuilt) or "none"
    unchanged = ", ".join(result.unchanged) or "none"
    if result.status != 0:
        print(
            f"{PREFIX}: image build failed (doit status {result.status}); the pool change stays "
            f"pending (images rebuilt so far: {rebuilt})",
            file=sys.stderr,
        )
        return 1
    print(f"{PREFIX}: images rebuilt: {rebuilt}; unchanged: {unchanged}", flush=True)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `apt-hook` (install, uninstall, collect, rebuild) to the `qlimage` command."""
    p = subparsers.add_parser(
        "apt-hook", help="head node: module packages installed by apt rebuild the images"
    )
    actions = p.add_subparsers(dest="apt_hook_action", required=True)
    for name, func, text in (
        ("install", cmd_install, f"write the apt hooks to APT_CONF_DIR/{SNIPPET}"),
        ("uninstall", cmd_uninstall, f"remove APT_CONF_DIR/{SNIPPET}"),
    ):
        a = actions.add_parser(name, help=text)
        a.add_argument(
            "--apt-conf-dir",
            type=Path,
            default=DEFAULT_APT_CONF_DIR,
            help=f"apt's configuration parts directory (default: {DEFAULT_APT_CONF_DIR})",
        )
        a.set_defaults(func=func)
    a = actions.add_parser(
        "collect", help="(apt's Pre-Install-Pkgs hook) copy module .debs from stdin to the pool"
    )
    a.add_argument("debs", nargs="*", type=Path, help=".deb files instead of apt's list on stdin")
    a.set_defaults(func=cmd_collect)
    a = actions.add_parser(
        "rebuild", help="(apt's Post-Invoke hook) rebuild the images if collect changed the pool"
    )
    a.add_argument("--no-wait", action="store_true", help="fail if another build is running")
    a.set_defaults(func=cmd_rebuild)
