"""The doit task graph of a site. dodo.py and `qlimage build` both call `site_tasks`.

Every task names the files it reads (`file_dep`) and writes (`targets`); trees enter the graph
as manifest files that are rewritten at load time only when the tree changed; `config_changed`
gets exactly the settings a task reads. So doit rebuilds what changed and nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doit.exceptions import TaskError
from doit.tools import config_changed

from qlimage.atomic import clamp_outputs_below, write_text
from qlimage.boot import grub, ipxe, loaders
from qlimage.boot import pxelinux as pxe
from qlimage.bundle import publish as node_files
from qlimage.bundle import sshfiles
from qlimage.errors import BootTestFailed, ConfigError, QlimageError
from qlimage.image import generations, initrd, kernel, overlays, publish, rootpw, stage
from qlimage.layout import Layout
from qlimage.pool import recipes
from qlimage.pool.packages import (
    ModulePackage,
    load_control_cache,
    resolve,
    save_control_cache,
    scan_pool,
)
from qlimage.site import Image, Site
from qlimage.tasks import stamp
from qlimage.tasks.run import OUTPUTS, PER_NODE, PER_NODE_PREFIX
from qlimage.trees import manifest

Task = dict[str, Any]


def doit_config(site: Site) -> dict[str, Any]:
    # Outputs are served to nodes by TFTP and HTTP servers running as other users: whatever the
    # admin's umask, what the build creates is world-readable unless it sets a tighter mode itself
    # (secrets do). This also keeps the umask out of the bytes of every archive we make.
    os.umask(0o022)
    layout = Layout(site)
    layout.bootfiles.mkdir(parents=True, exist_ok=True)
    repair_state(layout.doit_state)
    return {
        "dep_file": str(layout.doit_state),
        "backend": "json",
        "verbosity": 1,
        "default_tasks": None,
    }


_state: dict[Path, tuple[tuple[int, int, int, int], Any]] = {}


def read_state(path: Path) -> Any:
    """doit's JSON state, parsed once per process while the file is unchanged (the checks
    before the build and repair_state both read it; it is large for a large site)."""
    st = path.stat()
    key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if path not in _state or _state[path][0] != key:
        _state[path] = (key, json.loads(path.read_bytes()))
    return _state[path][1]


def repair_state(path: Path) -> None:
    """doit writes its JSON state in place, so a build killed at that moment leaves it torn.
    Set such a file aside instead of failing: every task then checks its targets again, and
    content-addressed generations make the rebuild publish nothing new."""
    try:
        state = read_state(path)
    except FileNotFoundError:
        return
    except ValueError:
        os.replace(path, path.with_name(path.name + ".torn"))
        print(
            f"qlimage: {path} was torn by an interrupted build; rebuilding from the outputs",
            file=sys.stderr,
        )
        return
    drop_node_tasks(path, state)


def drop_node_tasks(path: Path, state: Any) -> None:
    """Older versions had a task per node (`bundle:<node>`), now one `bundle` task: doit never
    forgets a task that is gone, and 10,000 of them would be read and written by every build."""
    if isinstance(state, dict) and any(k.startswith(PER_NODE_PREFIX) for k in state):
        kept = {k: v for k, v in state.items() if not k.startswith(PER_NODE_PREFIX)}
        write_text(path, json.dumps(kept))


def sync_manifest(tree: Path, output: Path) -> Path:
    """Write the tree's manifest to `output` only when it differs, so its mtime means change."""
    text = manifest(tree)
    if not output.exists() or output.read_text() != text:
        write_text(output, text)
    return output


def module_pool(site: Site) -> list[ModulePackage]:
    """The pool's .debs plus the ones recipes will build (known by name and version already)."""
    layout = Layout(site)
    cache = layout.pool_cache
    load_control_cache(cache)
    pool = {m.path: m for m in scan_pool(site.paths.pool)}
    if layout.bootfiles.is_dir():
        save_control_cache(cache)
    for r in site.recipes:
        path = recipes.recipe_output(site, r)
        pool.setdefault(path, ModulePackage(r.package, r.module, r.flavor, r.version, path))
    return list(pool.values())


def resolve_image(
    site: Site, image: Image, pool: list[ModulePackage], problems: list[str]
) -> list[ModulePackage]:
    """The image's modules in image order; each one that cannot be resolved is a problem line
    naming the image file and the module's place in it (`images.d/x.toml: .modules[1]: ...`)."""
    where = site.relative(image.source)
    out = []
    for module in image.modules:
        try:
            out.append(resolve(pool, module, image.flavor, image.version))
        except QlimageError as e:
            at = f".modules[{image.listed.index(module)}]" if module in image.listed else ""
            at = at or ".modules (core, which every image has)"
            problems.append(f"{where}: {at}: {e}")
    return out


@dataclass(frozen=True)
class Plan:
    """What the graph is made of, computed (and checked) before any task exists."""

    site: Site
    modules: dict[str, list[ModulePackage]]  # image name -> resolved modules, in image order
    rootpw: dict[str, str]  # image name -> digest of its root password hash


def plan(site: Site) -> Plan:
    """Resolve every image's modules and read its root password hash. ConfigError lists every
    problem of every image at once, one line each, each naming its file."""
    pool = module_pool(site)
    problems: list[str] = stage.input_problems(site, pool)  # module archives, overlays
    out = Layout(site)  # what we serve gets its mtimes clamped to the epoch, as the schema says
    clamp_outputs_below([out.tftpboot, out.pxelinux_cfg, out.qlustar], site.source_date_epoch)
    modules: dict[str, list[ModulePackage]] = {}
    digests: dict[str, str] = {}
    for name, img in site.images.items():
        modules[name] = resolve_image(site, img, pool, problems)
        try:
            digests[name] = rootpw.root_hash_digest(site, img)
        except ConfigError as e:
            problems += e.problems
        except QlimageError as e:
            problems.append(str(e))
    try:  # the SSH headers: read by the ssh and bundle task creators, which doit runs lazily
        sshfiles.check_headers(site)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    return Plan(site, modules, digests)


class UserFailure(TaskError):
    """A task stopped on a QlimageError. It carries the error's report lines, not the error
    (with `doit -n` it is pickled back from a worker process); qlimage's reporter collects it
    instead of printing doit's failure report. A TaskError, not a TaskFailed, so that plain
    `doit` exits with status 2 too."""

    def __init__(self, error: QlimageError) -> None:
        super().__init__(str(error))
        if isinstance(error, ConfigError | BootTestFailed):
            self.lines = error.problems
        else:
            self.lines = [one_line(error)]


def one_line(error: QlimageError) -> str:
    """The error as one line: its first line, the command it ran (which names the file a tool
    choked on: `run()` puts it on a `command:` detail line) and its hint."""
    first, *rest = error.message.splitlines() or [""]
    command = next((d.strip() for d in rest if d.strip().startswith("command: ")), None)
    text = f"{first} ({command})" if command else first
    return f"{text} (hint: {error.hint})" if error.hint else text


def guarded(action: Callable[..., Any]) -> Callable[..., Any]:
    """A user error stops the task as a UserFailure: reported once, as one line, by the CLI
    (or by dodo.py's reporter), never as doit's failure report. Anything else is a bug and
    reaches doit as the exception it is (a TaskError with its traceback)."""

    @functools.wraps(action)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = action(*args, **kwargs)
        except QlimageError as e:
            return UserFailure(e)
        # A dict is values for doit to keep with the task (the bundle task's); anything else an
        # action returns is not meant for doit, which would take False as a failure.
        return result if isinstance(result, dict) else None

    return wrapper


def content_changed(content: Any) -> config_changed:
    """config_changed of what a task writes, by its digest: doit keeps a string config as it
    is, and the per-host configs of 10,000 nodes would be megabytes that every build reads
    and writes back in doit's state."""
    text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
    return config_changed(hashlib.sha256(text.encode()).hexdigest())


def group(basename: str, doc: str) -> Task:
    """The entry `doit list` shows for a group of sub-tasks."""
    return {"basename": basename, "name": None, "doc": doc}


def task_modules(site: Site) -> Iterator[Task]:
    layout = Layout(site)
    yield group("module", "image-module .debs built from modules/*/recipe.toml")
    # Only what an image uses: a recipe kept for later (the systemd module on the demo site)
    # costs nothing until an image names it.
    used = {m for image in site.images.values() for m in image.modules}
    for r in site.recipes:
        if r.module not in used:
            continue
        files = sync_manifest(r.directory, layout.manifests / f"module-{r.module}.manifest")
        yield {
            "name": r.module,
            "doc": f"build {r.deb_name()} from Debian packages and modules/{r.module}/",
            "file_dep": [str(files)],
            "targets": [str(recipes.recipe_output(site, r))],
            "actions": [(recipes.build_module, [site, r])],
            "uptodate": [
                config_changed({"arch": site.archive.arch, "epoch": site.source_date_epoch})
            ],
            "clean": True,
        }


def task_kernel(site: Site) -> Task:
    layout = Layout(site)

    def fetch_and_unpack() -> None:
        kernel.unpack_kernel(kernel.kernel_deb(site), layout.kernel_dir)

    return {
        "doc": f"unpack the node kernel ({site.kernel_package}) and build its modules.dep",
        "file_dep": [str(site.kernel_deb)] if site.kernel_deb else [],
        "targets": [str(layout.kernel_info)],
        "actions": [fetch_and_unpack],
        "uptodate": [config_changed({"package": site.kernel_package, "deb": str(site.kernel_deb)})],
    }


def task_initrd(site: Site) -> Task:
    layout = Layout(site)

    return {
        "doc": "initrd (busybox, /init, NIC and image modules) and the kernel",
        "file_dep": [str(layout.kernel_info)],
        "targets": [str(layout.boot_current)],
        "actions": [(generations.publish_boot, [site])],
        "uptodate": [
            config_changed(
                {
                    "modules": list(site.initrd_modules),
                    "scripts": initrd.scripts_digest(),
                    "epoch": site.source_date_epoch,
                }
            )
        ],
    }


def overlay_manifests(site: Site, image: Image) -> list[Path]:
    layout = Layout(site)
    return [
        sync_manifest(layer, layout.manifests / f"overlay-{layer.name}.manifest")
        for layer in overlays.layers(site.paths.overlays, image.name)
    ]


def task_images(site: Site, p: Plan) -> Iterator[Task]:
    layout = Layout(site)
    yield group("stage", "staged root tree per image: modules, overlays, runner, root password")
    yield group("squashfs", "publish a squashfs generation per image, with sha256 and changelogs")
    for image in site.images.values():
        modules = p.modules[image.name]
        resolved = stage.resolved_modules_json(image, modules)
        stage_manifest = layout.stage_manifest(image.name)

        def do_stage(image: Image = image, modules: list[ModulePackage] = modules) -> None:
            dest = layout.stage(image.name)
            previous = publish.current(layout.image_root(image.name))
            stage.stage_image(site, image, modules, dest, previous=previous)
            stage.write_manifest(dest, layout.stage_manifest(image.name))

        yield {
            "basename": "stage",
            "name": image.name,
            "doc": f"stage image {image.name}: "
            + ", ".join(f"{m.module} {m.version}" for m in modules),
            "file_dep": [str(m.path) for m in modules]
            + [str(p) for p in overlay_manifests(site, image)],
            "targets": [str(stage_manifest)],
            "actions": [do_stage],
            "uptodate": [
                config_changed(
                    {
                        "modules": resolved,
                        "rootpw": p.rootpw[image.name],
                        "runner": stage.node_files_digest(),
                    }
                )
            ],
        }

        yield {
            "basename": "squashfs",
            "name": image.name,
            "doc": f"pack image {image.name} as squashfs ({site.squashfs_compressor}) with sha256",
            "file_dep": [str(stage_manifest)],
            "targets": [str(layout.image_current(image.name))],
            "task_dep": boot_test_deps(site, image.name),
            "actions": [(generations.publish_image, [site, image, resolved])],
            "uptodate": [
                config_changed(
                    {
                        "compressor": site.squashfs_compressor,
                        "level": site.squashfs_level,
                        "block_size": site.squashfs_block_size,
                        "epoch": site.source_date_epoch,
                        "modules": resolved,
                    }
                )
            ],
        }


def boot_test_deps(site: Site, image: str) -> list[str]:
    """What the boot test of a new generation boots with: everything but the image itself."""
    if not site.boot_test:
        return []
    from qlimage.image.boottest import test_node

    host = test_node(site, image)
    if host is None:
        return []
    return ["kernel", "initrd", "tftpboot", "pxelinux", "bundle"]


def task_pxelinux(site: Site) -> Iterator[Task]:
    layout = Layout(site)
    configs = pxe.configs(site)
    yield group("pxelinux", "pxelinux configs and per-host HOSTID links")
    yield {
        "name": "configs",
        "doc": "write pxelinux.cfg/default and one config per boot config",
        "file_dep": [],
        "targets": [str(layout.pxelinux_cfg / n) for n in sorted(configs)],
        "actions": [(pxe.write_configs, [site, layout.pxelinux_cfg])],
        "uptodate": [content_changed(configs)],
    }
    links = pxe.host_links(site)
    yield {
        "name": "links",
        "doc": "link pxelinux.cfg/<HOSTID> to each host's boot config",
        "file_dep": [],
        "targets": [str(layout.pxelinux_cfg / pxe.HOSTS_INDEX)],
        "actions": [(pxe.write_links, [links, layout.pxelinux_cfg])],
        "uptodate": [content_changed(links)],
    }


def task_grub(site: Site) -> Iterator[Task]:
    """UEFI netboot: the signed loaders (by package name, like the kernel: fetched again when
    the names, the architecture or the files change) and GRUB's default and per-host configs."""
    layout = Layout(site)
    yield group("grub", "UEFI netboot: signed shim and GRUB in tftpboot/, grub/ configs")
    yield loaders_task(
        site,
        loaders.LOADERS,
        "shim (bootx64.efi) and GRUB (grubx64.efi) from Debian's signed packages",
    )
    configs = grub.configs(site)
    yield {
        "name": "configs",
        "doc": "write grub/grub.cfg and grub/grub.cfg-01-<mac> for every host",
        "file_dep": [],
        "targets": [],
        **per_host_files(layout.grub_dir, configs),
        "actions": [(grub.write_configs, [configs, layout.grub_dir])],
        "uptodate": [content_changed(configs.digest), files_present(layout.grub_dir, configs)],
    }
    if grub.wants_http_module(site):
        module = grub.http_module(layout)
        yield {
            "name": "http-module",
            "doc": "grub/x86_64-efi/http.mod for GRUB over HTTP, from the signed GRUB's build",
            # a new signed GRUB needs the module of its own build
            "file_dep": [str(grub.signed_grub(layout))],
            "targets": [str(layout.tftpboot / module.name)],
            "actions": [(grub.install_http_module, [site])],
            "uptodate": [config_changed({"module": vars(module), "arch": site.archive.arch})],
        }


def task_ipxe(site: Site) -> Task:
    rendered = ipxe.scripts(site)
    dispatch = ipxe.dispatch()
    layout = Layout(site)
    return {
        "doc": "iPXE: tftpboot/boot.ipxe and ipxe/<mac>.ipxe per host (kernel, initrd over HTTP)",
        "file_dep": [],
        **per_host_files(layout.ipxe_dir, rendered),
        "targets": [str(layout.tftpboot / ipxe.DISPATCH)],
        "actions": [(ipxe.write_scripts, [rendered, dispatch, layout.tftpboot])],
        "uptodate": [
            content_changed([rendered.digest, dispatch]),
            files_present(layout.ipxe_dir, rendered),
        ],
    }


def per_host_files(directory: Path, names: Iterable[str]) -> Task:
    """The `meta` of a task that writes one file per host in `directory`, which it names in no
    doit targets (doit would stat each of 10,000 files in every build; `files_present` lists
    the directory once): the build stamp keys them all (`outputs`)."""
    return {"meta": {OUTPUTS: [f"{directory}/{n}" for n in names]}}


class files_present:
    """Up to date only while every file named is in `directory` (what doit's target check
    does, with one listing instead of a stat per file)."""

    def __init__(self, directory: Path, names: Iterable[str]) -> None:
        self.directory = directory
        self.names = set(names)

    def __call__(self, task: Any, values: dict[str, Any]) -> bool:
        if stamp.outputs_trusted():
            # The directory is as the stamped build left it, with every file then named; and
            # with the same digest this task names the same files (else it runs anyway).
            return True
        try:
            return self.names <= set(os.listdir(self.directory))
        except OSError:
            return False


def task_ipxeloaders(site: Site) -> Iterator[Task]:
    """iPXE itself in the TFTP tree, only for a site with a boot config that chain-loads it."""
    yield group("ipxeloaders", 'iPXE binaries for the boot configs with loader = "ipxe"')
    if not any(b.loader == "ipxe" for b in site.bootconfigs.values()):
        return
    yield loaders_task(
        site,
        loaders.IPXE_LOADERS,
        "undionly.kpxe (BIOS) and snponly.efi (UEFI) from Debian's ipxe package",
    )


def loaders_task(site: Site, chosen: tuple[loaders.Loader, ...], doc: str) -> Task:
    """Boot loaders copied from Debian packages into the TFTP tree (by package name, like the
    kernel: fetched again when the names, the architecture or the files change)."""
    return {
        "name": "loaders",
        "doc": doc,
        "file_dep": [],
        "targets": [str(Layout(site).tftpboot / n) for n in loaders.loader_names(chosen)],
        "actions": [(loaders.install_loaders, [site, chosen])],
        "uptodate": [
            config_changed({"loaders": [vars(x) for x in chosen], "arch": site.archive.arch})
        ],
    }


def task_bundles(site: Site) -> Iterator[Task]:
    """One task for every node's bundle: it publishes exactly the nodes whose inputs changed
    (or whose served files did), and the reporter names each (`.  bundle:<node>`). Yielded,
    not returned: doit runs generator creators after the others (it orders creators by their
    line, and `creator` makes two kinds), so bundles come after the images, as always."""
    nodes = node_files.NodeBundles(site)
    yield {
        "basename": "bundle",
        "doc": "per-node bundles: every file and action the node runner applies",
        "file_dep": [],
        "targets": [str(Layout(site).bundle_table)],
        "actions": [nodes.publish],
        "uptodate": [nodes.up_to_date],
        "meta": {PER_NODE: nodes, OUTPUTS: nodes.outputs()},
    }


def task_ssh(site: Site) -> Iterator[Task]:
    """One task per SSH host file in the served qlustar/cluster/, each up to date on its own
    text, and their SHA256SUMS written after them: editing one header (or a host's keys, names
    or addresses) rewrites the files it changes and SHA256SUMS, and no bundle."""
    layout = Layout(site)
    yield group("ssh", "the cluster's ssh_known_hosts and shosts.equiv in qlustar/cluster/")
    texts = {f.name: text for f, text in sshfiles.render_all(site).items()}
    for f in sshfiles.HOST_FILES:
        yield {
            "name": f.name,
            "doc": f"qlustar/cluster/{f.name}: {f.header} plus every host of nodes.d",
            "file_dep": [],
            "targets": [str(f.output(layout))],
            "actions": [(sshfiles.write, [texts[f.name], f.output(layout)])],
            "uptodate": [content_changed(texts[f.name])],
        }
    sums = sshfiles.sums(texts)
    target = layout.cluster_file(sshfiles.SUMS)
    yield {
        "name": sshfiles.SUMS,
        "doc": "qlustar/cluster/SHA256SUMS: what the node runner verifies the files with",
        "file_dep": [],
        "targets": [str(target)],
        # Last, so the served sums never name a file not yet served; a node that fetched the
        # old sums and then a new file sees a mismatch and retries, as for its bundle.
        "task_dep": [f"ssh:{f.name}" for f in sshfiles.HOST_FILES],
        "actions": [(sshfiles.write, [sums, target])],
        "uptodate": [content_changed(sums)],
    }


def task_exports(site: Site) -> Task:
    """The NFS exports of the chroots the head serves, up to date on its text alone."""
    from qlimage.serve import exports

    text = exports.render(site)
    return {
        "doc": "head/exports.d/qlustar-chroots.exports: the NFS exports of the chroots",
        "file_dep": [],
        "targets": [str(exports.output(site))],
        "actions": [(exports.write, [text, exports.output(site)])],
        "uptodate": [content_changed(text)],
    }


def task_prune(site: Site) -> Task:
    """Outputs of hosts and images that left the site go in the same build. Its input is the
    set of what should exist, so a no-op build does not even list the directories."""
    layout = Layout(site)
    macs = sorted(node_files.node_name(h) for h in site.hosts)
    images = sorted(site.images)

    def prune() -> None:
        node_files.prune_nodes(layout, macs)
        publish.prune_images(layout, images)

    return {
        "doc": "remove the node files of hosts and the generations of images that left the site",
        "file_dep": [],
        "targets": [],
        "actions": [prune],
        "uptodate": [config_changed({"nodes": macs, "images": images})],
    }


def task_tftpboot(site: Site) -> Task:
    layout = Layout(site)
    return {
        "doc": "TFTP tree: pxelinux.0, ldlinux.c32 and the pxelinux.cfg and qlustar links",
        "file_dep": [str(pxe.PXELINUX), str(pxe.LDLINUX)],
        "targets": [
            str(layout.tftpboot / n)
            for n in ("pxelinux.0", "ldlinux.c32", "pxelinux.cfg", "qlustar")
        ],
        "actions": [(pxe.install_tftp_tree, [layout.tftpboot])],
    }


def task_headconfigs(site: Site) -> Task:
    from qlimage.serve import head

    rendered = head.configs(site)
    return {
        "doc": "head service configs: dnsmasq (DHCP, TFTP) and nginx (HTTP) in head/",
        "file_dep": [],
        "targets": [str(p) for p in rendered],
        "actions": [(head.write_configs, [rendered])],
        "uptodate": [config_changed(head.digest(rendered))],
    }


def guard(task: Task) -> Task:
    task["actions"] = [
        (guarded(a[0]), *a[1:]) if isinstance(a, tuple) else guarded(a)
        for a in task.get("actions", [])
    ]
    return task


def creator(make: Callable[[], Any]) -> Callable[[], Any]:
    """A doit task creator: a dict for one task, a generator for a group (doit wants those)."""
    tasks = make()
    if isinstance(tasks, dict):
        return lambda: guard(tasks)

    def generate() -> Iterator[Task]:
        for t in tasks:
            yield guard(t)

    return generate


def site_tasks(site: Site, p: Plan | None = None) -> dict[str, Any]:
    """`task_*` creators for doit's loader (names are what `doit list` shows).

    The plan (`tasks.check.check_build`'s, else made here) is made eagerly, so a site whose
    images cannot be resolved fails before doit starts, with the same one-line errors as a
    schema problem.
    """
    p = p or plan(site)
    makers: dict[str, Callable[[], Any]] = {
        "module": lambda: task_modules(site),
        "kernel": lambda: task_kernel(site),
        "initrd": lambda: task_initrd(site),
        "images": lambda: task_images(site, p),
        "pxelinux": lambda: task_pxelinux(site),
        "grub": lambda: task_grub(site),
        "ipxe": lambda: task_ipxe(site),
        "ipxeloaders": lambda: task_ipxeloaders(site),
        "bundle": lambda: task_bundles(site),
        "ssh": lambda: task_ssh(site),
        "exports": lambda: task_exports(site),
        "prune": lambda: task_prune(site),
        "tftpboot": lambda: task_tftpboot(site),
        "headconfig": lambda: task_headconfigs(site),
    }
    return {f"task_{name}": creator(make) for name, make in makers.items()}
