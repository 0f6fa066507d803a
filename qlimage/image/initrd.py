"""The initrd: busybox, /init and just the kernel modules needed to fetch and mount the image.

Nothing image- or site-specific is baked in (all of that comes from the kernel command line), so
one initrd per kernel serves every image of the site.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path

from qlimage.atomic import TMP_PREFIX, atomic_path
from qlimage.errors import BuildError
from qlimage.run import run
from qlimage.trees import clamp_mtimes, walk

# Applets /init and the udhcpc hook call; links for them are created in /bin.
APPLETS = (
    "sh",
    "mount",
    "umount",
    "mkdir",
    "cat",
    "echo",
    "insmod",
    "ip",
    "ifconfig",
    "route",
    "udhcpc",
    "wget",
    "sha256sum",
    "cut",
    "tr",
    "sleep",
    "switch_root",
    "setsid",
    "uname",
    "rm",
    "cp",
    "ls",
    "dmesg",
    "ps",
    "grep",
    "sed",
    "mdev",
)


def read_modules_dep(path: Path) -> dict[str, list[str]]:
    """modules.dep as {module name: [dependency paths..., own path]} (own path last)."""
    deps: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if ":" not in line:
            continue
        own, _, rest = line.partition(":")
        deps[module_name(own)] = [*reversed(rest.split()), own]
    return deps


def module_name(path: str) -> str:
    base = Path(path).name.split(".ko")[0]
    return base.replace("-", "_")


def builtin_modules(path: Path) -> set[str]:
    return {module_name(line) for line in path.read_text().splitlines() if line}


def module_load_order(modules_dir: Path, wanted: Iterable[str]) -> list[str]:
    """Module files to insmod, dependencies before dependants, each once.

    modules.dep lists a module's dependencies so that loading them from last to first works;
    wanted modules that are built into the kernel are skipped, unknown ones are an error.
    """
    deps = read_modules_dep(modules_dir / "modules.dep")
    builtin = builtin_modules(modules_dir / "modules.builtin")
    order: list[str] = []
    for name in wanted:
        key = name.replace("-", "_")
        if key in builtin:
            continue
        if key not in deps:
            raise BuildError(
                f"initrd module {name!r} is not in {modules_dir}/modules.dep",
                hint="check initrd.modules in site.toml",
            )
        for path in deps[key]:
            if path not in order:
                order.append(path)
    return order


def copy_module(src: Path, dst: Path) -> Path:
    """Copy a module into the initrd, decompressing .ko.xz so busybox insmod can load it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix == ".xz":
        dst = dst.with_suffix("")
        dst.write_bytes(lzma.decompress(src.read_bytes()))
    else:
        shutil.copyfile(src, dst)
    os.chmod(dst, 0o644)
    return dst


# Every node-side script of qlimage/node/initrd that goes into the initrd.
NODE_SCRIPTS = ("init", "udhcpc.script", "ql-mcast-client")


def data_file(name: str) -> bytes:
    return resources.files("qlimage.node").joinpath(f"initrd/{name}").read_bytes()


def scripts_digest() -> str:
    """The node-side scripts baked into the initrd: a change to any of them rebuilds it."""
    h = hashlib.sha256()
    for name in NODE_SCRIPTS:
        h.update(name.encode() + b"\0" + data_file(name) + b"\0")
    return h.hexdigest()


def populate_initrd(
    root: Path, *, busybox: Path, kernel_modules: Path, kver: str, modules: Iterable[str]
) -> None:
    for d in ("bin", "sbin", "dev", "proc", "sys", "run", "tmp", "etc/qlustar", "newroot", "union"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    shutil.copyfile(busybox, root / "bin/busybox")
    os.chmod(root / "bin/busybox", 0o755)
    for applet in APPLETS:
        os.symlink("busybox", root / "bin" / applet)
    for name, mode in (("init", 0o755), ("udhcpc.script", 0o755)):
        target = root / name if name == "init" else root / "etc/qlustar" / name
        target.write_bytes(data_file(name))
        os.chmod(target, mode)
    order = module_load_order(kernel_modules, modules)
    loaded = []
    for rel in order:
        dst = copy_module(kernel_modules / rel, root / "lib/modules" / kver / rel)
        loaded.append(dst.relative_to(root / "lib/modules" / kver).as_posix())
    (root / "etc/qlustar/modules.order").write_text("".join(f"{m}\n" for m in loaded))
    normalize_modes(root)


def normalize_modes(root: Path) -> None:
    """Directories 0755 (/tmp 1777), plain data files 0644: the umask must not reach the bytes."""
    for path in walk(root):
        if path.is_symlink():
            continue
        if path.is_dir():
            os.chmod(path, 0o1777 if path == root / "tmp" else 0o755)
        elif not os.access(path, os.X_OK) or path.suffix == ".ko":
            os.chmod(path, 0o644)


def make_cpio(root: Path, output: Path, epoch: int) -> None:
    """A newc cpio of `root`, byte-identical for identical trees.

    Sorted names, owners forced to 0:0, mtimes clamped, --reproducible (fixed inode and device
    numbers); compressed with gzip -n so no name or time lands in the header.
    """
    clamp_mtimes(root, epoch)
    names = b"".join(os.fsencode(p.relative_to(root)) + b"\0" for p in walk(root))
    with atomic_path(output) as tmp:
        archive = run(
            [
                "cpio",
                "--create",
                "--null",
                "--quiet",
                "--reproducible",
                "-H",
                "newc",
                "-R",
                "0:0",
            ],
            cwd=root,
            input=names,
            capture=True,
        ).stdout
        tmp.write_bytes(run(["gzip", "-n", "-9"], input=archive, capture=True).stdout)
        os.chmod(tmp, 0o644)


def build_initrd(
    output: Path,
    *,
    busybox: Path,
    kernel_modules: Path,
    kver: str,
    modules: Iterable[str],
    epoch: int,
    extra: Mapping[str, bytes] | None = None,
    multicast: Path | None = None,
    arch: str = "amd64",
) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX + "initrd.", dir=output.parent) as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        os.chmod(root, 0o755)
        populate_initrd(
            root, busybox=busybox, kernel_modules=kernel_modules, kver=kver, modules=modules
        )
        for rel, data in (extra or {}).items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        if multicast is not None:
            add_multicast_client(root, multicast, arch)
        normalize_modes(root)
        make_cpio(root, output, epoch)


# The multicast client: ql-mcast-client (busybox sh) runs udp-receiver (Debian's udpcast), which
# needs its libraries and the dynamic loader from Debian's libc6 -- the archive's, never the
# head's, so that the initrd's bytes follow the archive alone. Per Debian architecture: the
# multiarch library directory, the loader path the binary names (its ELF interpreter) and the
# libraries it links (`ldd udp-receiver`); tests run it chrooted in the initrd, so a library
# missing here fails there.
MCAST_CLIENT = "bin/ql-mcast-client"
UDP_RECEIVER = "usr/bin/udp-receiver"
MCAST_ARCHES = {
    "amd64": (
        "lib/x86_64-linux-gnu",
        "lib64/ld-linux-x86-64.so.2",
        ("ld-linux-x86-64.so.2", "libc.so.6", "libdl.so.2", "libpthread.so.0"),
    ),
}


def multicast_files(arch: str) -> list[str]:
    """Every file add_multicast_client puts in the initrd, relative to its root."""
    libdir, loader, libs = mcast_arch(arch)
    return [MCAST_CLIENT, UDP_RECEIVER, loader, *(f"{libdir}/{lib}" for lib in libs)]


def mcast_arch(arch: str) -> tuple[str, str, tuple[str, ...]]:
    if arch not in MCAST_ARCHES:
        raise BuildError(
            f"the initrd's multicast client is not packaged for architecture {arch!r}",
            hint=f"supported: {', '.join(MCAST_ARCHES)}",
        )
    return MCAST_ARCHES[arch]


def copy_executable(src: Path, dst: Path) -> None:
    """A regular file of the extracted packages: a link could lead out of their tree."""
    if src.is_symlink() or not src.is_file():
        raise BuildError(f"{src}: expected a regular file in the extracted package")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o755)


def add_multicast_client(root: Path, debs: Path, arch: str) -> None:
    """ql-mcast-client, udp-receiver, its libraries and the loader, from `debs` (udpcast and
    libc6 extracted there with dpkg-deb -x)."""
    libdir, loader, libs = mcast_arch(arch)
    client = root / MCAST_CLIENT
    client.parent.mkdir(parents=True, exist_ok=True)
    client.write_bytes(data_file("ql-mcast-client"))
    os.chmod(client, 0o755)
    copy_executable(debs / UDP_RECEIVER, root / UDP_RECEIVER)
    for lib in libs:
        copy_executable(debs / libdir / lib, root / libdir / lib)
    link = root / loader
    link.parent.mkdir(parents=True, exist_ok=True)
    target = root / libdir / Path(loader).name
    if link != target:
        os.symlink(os.path.relpath(target, link.parent), link)
