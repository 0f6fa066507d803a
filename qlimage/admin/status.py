"""`qlimage status`: what is published, what the site would build now and why, and which
generation each node last fetched.

Read-only by design: it never takes the build lock (an admin asks for the status precisely
while a build runs), so everything it reads may change under it. It asks doit whether the
image and boot tasks are up to date the way `qlimage doit info` does (the same task
definitions, doit's own `get_status`), over a private, read-only view of doit's state that is
never written back. Like `doit info`, making the task definitions refreshes the overlay
manifests (`tasks.graph.sync_manifest`, atomic and only when a tree changed): that is how doit
sees an overlay change at all.

The head's access log (nginx, `qlimage serve`) is read as a bounded tail: a node's last fetch
is the newest successful request below `images/<image>/<generation>/`; every boot fetches its
generation's checksum file over HTTP, multicast or not (node/initrd/init), so the checksum
request alone marks the boot.
"""

from __future__ import annotations

import functools
import json
import os
import re
import stat
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from qlimage import contract
from qlimage.errors import ConfigError, QlimageError
from qlimage.image import boottest, overlays, publish
from qlimage.layout import Layout
from qlimage.site import Site
from qlimage.site.model import Host
from qlimage.trees import file_digest, resolve_in_root, walk

# How much of the access log's end is read: the last boots of every node of a large site fit
# (about 200 bytes a request, a few requests a boot), and the time stays bounded however long
# nginx has been writing.
LOG_TAIL_BYTES = 64 * 1024 * 1024
# HTTP statuses that mean the node got the file (304: a client's cached copy is current).
FETCHED = frozenset({200, 206, 304})
# An image or generation name as the build writes them (no `..`, no control characters).
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# A torn doit state (a build writing it in place) is read again after this pause, once.
STATE_RETRY_S = 0.2
# The changed overlay files a reason names before it says "and N more".
NAMED_FILES = 5


@dataclass
class Fetch:
    """A node's newest successful request below an image generation in the access log."""

    image: str
    generation: str
    time: float
    uri: str


@dataclass
class LogSummary:
    path: str
    exists: bool = False
    read_bytes: int = 0
    requests: int = 0  # successful requests of image generations found in the tail
    skipped_lines: int = 0  # lines below the images path that are no access log entry
    problem: str | None = None  # why the log could not be read at all
    fetches: dict[str, Fetch] = field(default_factory=dict)  # by client address


@dataclass
class Pending:
    """Whether doit would run something for an output, and why (reasons in plain words)."""

    pending: bool | None  # None: unknown (doit's state unreadable)
    reasons: list[str]


# --- the report ----------------------------------------------------------------------------


def site_status(
    site: Site,
    *,
    image: str | None = None,
    stale_only: bool = False,
    log_tail: int = LOG_TAIL_BYTES,
) -> dict[str, Any]:
    """The status as plain data (what `--json` prints and the table is made from)."""
    names = selected_images(site, image)
    layout = Layout(site)
    graph = GraphView.load(site)
    log = read_access_log(layout, log_tail)
    images = [image_status(site, graph, name) for name in names]
    current = {i["name"]: i["generation"] for i in images}
    nodes = [node_status(site, h, current, log) for h in site.hosts if image_of(site, h) in names]
    if stale_only:
        nodes = [n for n in nodes if n["stale"]]
    return {
        "site": site.name,
        "build_running": layout.running.exists(),
        "apt_hook_pending": layout.apt_hook_marker.exists(),
        "plan_problems": graph.problems,
        "boot": boot_status(graph, layout),
        "images": images,
        "nodes": nodes,
        "access_log": {
            "path": log.path,
            "exists": log.exists,
            "read_bytes": log.read_bytes,
            "requests": log.requests,
            "skipped_lines": log.skipped_lines,
            "problem": log.problem,
        },
    }


def selected_images(site: Site, image: str | None) -> list[str]:
    if image is None:
        return sorted(site.images)
    if image not in site.images:
        known = ", ".join(sorted(site.images)) or "none"
        raise QlimageError(f"--image: unknown image {image!r} (images.d has: {known})")
    return [image]


def image_of(site: Site, host: Host) -> str:
    """The image a host boots: hosts -> boot config -> image."""
    return site.bootconfigs[host.bootconfig].image


# --- published generations -----------------------------------------------------------------


def generation_info(root: Path) -> tuple[str | None, Path | None, list[str]]:
    """(current generation's name, its directory, the history), tolerating a tree that a
    build or a prune is changing right now (a name that vanished is simply not there)."""
    name = publish.current_name(root)
    gen = publish.current(root)
    try:
        history = publish.history(root)
    except OSError:
        history = []
    return (name if gen is not None else None), gen, history


def read_hand_edit(gen: Path | None) -> dict[str, Any] | None:
    """The hand-edited marker (`qlimage edit -i/-s`) of a generation, None for one built from
    inputs; an unreadable marker still says the generation was hand-edited."""
    from qlimage.admin.handedit import hand_edited

    try:
        return hand_edited(gen)
    except QlimageError as e:
        return {"unreadable": str(e)}


def file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def read_checksum(path: Path) -> str | None:
    """The digest a checksum file names (`<hex>  <name>`), None if absent or malformed."""
    try:
        words = path.read_text(errors="replace").split()
    except OSError:
        return None
    return words[0] if words and len(words[0]) == 64 else None


def published_modules(gen: Path | None) -> list[dict[str, str]] | None:
    if gen is None:
        return None
    try:
        data = json.loads((gen / contract.MODULES_JSON).read_text())
        return [
            {"module": str(m["module"]), "package": str(m["package"]), "version": str(m["version"])}
            for m in data["modules"]
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def image_status(site: Site, graph: GraphView, name: str) -> dict[str, Any]:
    layout = Layout(site)
    generation, gen, history = generation_info(layout.image_root(name))
    image_file = gen / contract.image_file(name) if gen else None
    published = published_modules(gen)
    resolved = graph.resolved(name)
    pending = graph.image_pending(name, published)
    edit = read_hand_edit(gen)
    return {
        "name": name,
        "generation": generation,
        "history": history,
        "sha256": read_checksum(gen / contract.image_sum_file(name)) if gen else None,
        "size": file_size(image_file) if image_file else None,
        "hand_edited": edit is not None,
        "hand_edit": edit,
        # The boot test's record ([publish] boot_test): None when the generation was not tested.
        "boot_test": boottest.passed(gen) if gen else None,
        "modules": {"published": published, "resolved": resolved},
        "rebuild_pending": pending.pending,
        "reasons": pending.reasons,
        "nodes": sorted(h.name for h in site.hosts if image_of(site, h) == name),
    }


def boot_status(graph: GraphView, layout: Layout) -> dict[str, Any]:
    generation, gen, history = generation_info(layout.boot)
    pending = graph.boot_pending()
    edit = read_hand_edit(gen)
    return {
        "generation": generation,
        "history": history,
        "kernel_size": file_size(gen / contract.KERNEL_FILE) if gen else None,
        "initrd_size": file_size(gen / contract.INITRD_FILE) if gen else None,
        "hand_edited": edit is not None,
        "hand_edit": edit,
        "rebuild_pending": pending.pending,
        "reasons": pending.reasons,
    }


# --- what doit would do --------------------------------------------------------------------


class StateView:
    """doit's state as a read-only backend for doit's `Dependency` (the JsonDB interface):
    `get_status` may drop a task's entry in memory; nothing is ever written back."""

    def __init__(
        self, name: str, codec: Any, *, module_name: str | None = None, state: Mapping[str, Any]
    ) -> None:
        self.name = name
        self._db: dict[str, Any] = dict(state)

    def get(self, task_id: str, dependency: str) -> Any:
        entry = self._db.get(task_id)
        return entry.get(dependency) if isinstance(entry, dict) else None

    def in_(self, task_id: str) -> bool:
        return task_id in self._db

    def remove(self, task_id: str) -> None:
        self._db.pop(task_id, None)

    def set(self, task_id: str, dependency: str, value: Any) -> None:
        raise AssertionError("qlimage status never records doit state")

    def remove_all(self) -> None:
        raise AssertionError("qlimage status never records doit state")

    def dump(self) -> None:
        raise AssertionError("qlimage status never writes doit's state")


def read_doit_state(path: Path) -> dict[str, Any] | None:
    """doit's JSON state; {} when there is none yet; None when it stays unreadable (doit
    rewrites it in place at the end of a build: read again once after a pause)."""
    for attempt in range(2):
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            if attempt == 0:
                time.sleep(STATE_RETRY_S)
            continue
        return data if isinstance(data, dict) else None
    return None


@dataclass
class GraphView:
    """The image and boot tasks of the site's graph with doit's verdict on each."""

    site: Site
    tasks: dict[str, Any]  # task name -> doit Task
    modules: dict[str, list[Any]] | None  # image -> resolved ModulePackages; None: unresolved
    problems: list[str]  # why the plan failed (the site does not resolve), one line each
    dependency: Any | None  # doit's Dependency over StateView; None: state unreadable

    @classmethod
    def load(cls, site: Site) -> GraphView:
        from doit.dependency import Dependency

        from qlimage.pool.packages import load_control_cache
        from qlimage.tasks import graph

        layout = Layout(site)
        load_control_cache(layout.pool_cache)
        try:
            p: graph.Plan | None = graph.plan(site)
        except ConfigError as e:
            return cls(site, {}, None, e.problems, None)
        except QlimageError as e:
            return cls(site, {}, None, [str(e)], None)
        assert p is not None
        # Only the tasks that make images and the boot generation: a node's bundle task costs
        # a render, and a site has thousands.
        made = [
            (graph.task_modules(site), "module"),
            ([graph.task_kernel(site)], "kernel"),
            ([graph.task_initrd(site)], "initrd"),
            (graph.task_images(site, p), ""),
        ]
        tasks = {t.name: t for group, base in made for t in doit_tasks(group, base)}
        state = read_doit_state(layout.doit_state)
        dependency = None
        if state is not None:
            view = functools.partial(StateView, state=state)
            dependency = Dependency(view, str(layout.doit_state))
        return cls(site, tasks, p.modules, [], dependency)

    def resolved(self, image: str) -> list[dict[str, str]] | None:
        if self.modules is None:
            return None
        return [
            {"module": m.module, "package": m.package, "version": m.version}
            for m in self.modules[image]
        ]

    def status(self, name: str) -> tuple[str, dict[str, Any]]:
        """doit's status of one task ('up-to-date', 'run' or 'error') and its reasons."""
        assert self.dependency is not None
        result = self.dependency.get_status(self.tasks[name], self.tasks, get_log=True)
        return result.status, dict(result.reasons)

    def unknown(self) -> Pending | None:
        if self.problems:
            return Pending(True, [f"the site does not resolve: {self.problems[0]}"])
        if self.dependency is None:
            return Pending(None, ["doit's state is unreadable (a build is writing it?)"])
        return None

    def image_pending(self, image: str, published: list[dict[str, str]] | None) -> Pending:
        if (early := self.unknown()) is not None:
            return early
        reasons = module_changes(published, self.resolved(image) or [])
        for module in self.recipe_tasks(image):
            state, why = self.status(module)
            if state != "up-to-date":
                reasons += recipe_reasons(self.site, module, why)
        stage_state, why = self.status(f"stage:{image}")
        if stage_state != "up-to-date":
            reasons += stage_reasons(self.site, image, why, modules_changed=bool(reasons))
        pack_state, why = self.status(f"squashfs:{image}")
        if pack_state != "up-to-date":
            reasons += pack_reasons(
                self.site, image, why, stage_pending=stage_state != "up-to-date"
            )
        return Pending(bool(reasons), unique(reasons))

    def boot_pending(self) -> Pending:
        if (early := self.unknown()) is not None:
            return early
        kernel_state, why = self.status("kernel")
        reasons = [] if kernel_state == "up-to-date" else kernel_reasons(self.site, why)
        initrd_state, why = self.status("initrd")
        if initrd_state != "up-to-date":
            reasons += initrd_reasons(why, kernel_pending=bool(reasons))
        return Pending(bool(reasons), unique(reasons))

    def recipe_tasks(self, image: str) -> list[str]:
        """The module:<m> tasks that build a .deb this image stages."""
        from qlimage.pool import recipes

        assert self.modules is not None
        debs = {str(m.path) for m in self.modules[image]}
        return [
            f"module:{r.module}"
            for r in self.site.recipes
            if str(recipes.recipe_output(self.site, r)) in debs
        ]


def doit_tasks(made: Iterable[dict[str, Any]], basename: str) -> Iterator[Any]:
    """doit Task objects from our task dicts (group entries, which do nothing, left out)."""
    from doit.task import Task

    for t in made:
        if "name" in t and t["name"] is None:  # a group: its sub-tasks are named after it
            basename = t.get("basename", basename)
            continue
        base = t.get("basename", basename)
        name = f"{base}:{t['name']}" if "name" in t else base
        yield Task(
            name,
            t["actions"],
            file_dep=t.get("file_dep", ()),
            targets=t.get("targets", ()),
            uptodate=t.get("uptodate", ()),
        )


def module_changes(
    published: list[dict[str, str]] | None, resolved: list[dict[str, str]]
) -> list[str]:
    """What the site resolves now against what the current generation was built from."""
    if published is None:
        return []
    before = {m["module"]: m["version"] for m in published}
    now = {m["module"]: m["version"] for m in resolved}
    out = []
    for module, version in now.items():
        if module not in before:
            out.append(f"module {module} added ({version})")
        elif before[module] != version:
            out.append(f"module {module} resolves to {version} (published: {before[module]})")
    out += [f"module {m} removed (published: {v})" for m, v in before.items() if m not in now]
    return out


def kernel_reasons(site: Site, why: Mapping[str, Any]) -> list[str]:
    if why.get("missing_target"):
        return ["kernel not unpacked yet"]
    if why.get("changed_file_dep") or why.get("missing_file_dep"):
        return [f"kernel package {site.kernel_deb} changed"]
    return ["kernel settings changed (site.toml: kernel package or .deb)"]


def initrd_reasons(why: Mapping[str, Any], *, kernel_pending: bool) -> list[str]:
    if why.get("missing_target"):
        return ["no boot generation published"]
    if kernel_pending:
        return []  # the kernel's reasons say why
    if why.get("changed_file_dep") or why.get("missing_file_dep"):
        return ["the unpacked kernel changed"]
    return ["initrd settings changed (site.toml: initrd modules or epoch, or qlimage's scripts)"]


def recipe_reasons(site: Site, task: str, why: Mapping[str, Any]) -> list[str]:
    module = task.split(":", 1)[1]
    if why.get("missing_target"):
        return [f"module {module}: package not built yet (modules/{module}/recipe.toml)"]
    if why.get("changed_file_dep"):
        return [f"module {module}: recipe changed (modules/{module}/)"]
    return [f"module {module}: recipe settings changed (archive architecture or epoch)"]


def stage_reasons(
    site: Site, image: str, why: Mapping[str, Any], *, modules_changed: bool
) -> list[str]:
    layout = Layout(site)
    out: list[str] = []
    if why.get("missing_target"):
        out.append(f"no staged tree ({site.relative(layout.stage_manifest(image))} missing)")
    manifests = {
        str(layout.manifests / f"overlay-{layer.name}.manifest"): layer
        for layer in overlays.layers(site.paths.overlays, image)
    }
    layers = overlays.layers(site.paths.overlays, image)
    for dep in sorted(why.get("changed_file_dep") or []):
        if dep in manifests:
            out += overlay_reasons(site, image, manifests[dep], layers)
        elif not modules_changed:
            out.append(f"module package {site.relative(Path(dep))} changed")
    for dep in why.get("missing_file_dep") or []:
        out.append(f"module package {site.relative(Path(dep))} missing")
    if why.get("uptodate_false") and not modules_changed:
        out += stage_setting_changes(site, image)
    if not out and not modules_changed and why.get("has_no_dependencies") is not True:
        out.append(f"doit would restage {image}")
    return out


def stage_setting_changes(site: Site, image: str) -> list[str]:
    """Which of the stage's settings besides the modules changed: doit keeps only one digest
    of them, so each is compared with what the last staging put into the staged tree (the root
    hash is compared, never shown)."""
    from qlimage.image import rootpw

    staged = Layout(site).stage(image)
    out = []
    try:
        before: str | None = rootpw.read_root_hash(
            resolve_in_root(staged, "etc/shadow", follow=True)
        )
    except (OSError, QlimageError):
        before = None
    try:
        now: str | None = rootpw.image_root_hash(site, site.images[image])
    except QlimageError:
        now = None
    if before != now:
        pw = site.relative(site.images[image].root_hash_file)
        out.append(f"the root password changed ({pw}, else the head's)")
    if changed := changed_node_files(staged):
        more = f" and {len(changed) - NAMED_FILES} more" if len(changed) > NAMED_FILES else ""
        out.append(f"qlimage's node files changed: {', '.join(changed[:NAMED_FILES])}{more}")
    return out or ["the root password or qlimage's node files changed"]


def changed_node_files(staged: Path) -> list[str]:
    """The node files (init.qlustar, the runner) this qlimage installs that differ from the
    staged tree's, and runner modules staged that it no longer has; as paths in the image."""
    from qlimage.image import stage

    files = stage.node_files()
    out = []
    for path, (data, mode) in files.items():
        try:
            target = resolve_in_root(staged, path)
            same = target.read_bytes() == data and stat.S_IMODE(target.lstat().st_mode) == mode
        except OSError:
            same = False
        if not same:
            out.append(f"/{path}")
    try:
        package = resolve_in_root(staged, stage.RUNNER_PACKAGE, follow=True)
        extra = sorted(p.name for p in package.glob("*.py"))
    except OSError:
        extra = []
    out += [
        f"/{stage.RUNNER_PACKAGE}/{n}" for n in extra if f"{stage.RUNNER_PACKAGE}/{n}" not in files
    ]
    return out


def pack_reasons(
    site: Site, image: str, why: Mapping[str, Any], *, stage_pending: bool
) -> list[str]:
    if why.get("missing_target"):
        return ["no generation published"]
    if stage_pending:
        return []  # the staging's reasons say why
    if why.get("changed_file_dep"):
        return [f"the staged tree changed since image {image} was packed"]
    if why.get("uptodate_false"):
        return ["packing settings changed (site.toml: squashfs compressor, level, block size "
                "or source_date_epoch)"]  # fmt: skip
    return [f"doit would repack {image}"]


def overlay_reasons(site: Site, image: str, layer: Path, layers: Sequence[Path]) -> list[str]:
    """Name the files of an overlay layer that differ from the staged tree (the last build's
    view of it); a layer whose every file matches lost a file or changed its `remove` list."""
    later = layers[list(layers).index(layer) + 1 :]
    changed = changed_overlay_files(layer, Layout(site).stage(image), later)
    if changed:
        shown = ", ".join(site.relative(p) for p in changed[:NAMED_FILES])
        more = f" and {len(changed) - NAMED_FILES} more" if len(changed) > NAMED_FILES else ""
        return [f"overlay file {shown}{more} changed"]
    if (layer / "remove").exists():
        return [f"overlay {site.relative(layer)} changed (a file removed, or its remove list)"]
    return [f"overlay {site.relative(layer)} changed (a file removed)"]


def changed_overlay_files(layer: Path, stage: Path, later: Sequence[Path]) -> list[Path]:
    """The layer's copy/ entries whose type, mode, owner, content or link target differs from
    the staged tree's; entries a later layer also carries are the later layer's to judge."""
    copy = layer / "copy"
    if not copy.is_dir() or copy.is_symlink():
        return []
    out = []
    for path in walk(copy):
        rel_path = path.relative_to(copy).as_posix()
        if any(os.path.lexists(lay / "copy" / rel_path) for lay in later):
            continue
        if not same_entry(path, staged_entry(stage, rel_path)):
            out.append(path)
    return out


def staged_entry(stage: Path, rel_path: str) -> Path | None:
    """The staged path an overlay entry lands on, resolved inside the stage (the image's
    links mean paths in the image, never on the head)."""
    try:
        return resolve_in_root(stage, rel_path)
    except OSError:
        return None


def same_entry(source: Path, staged: Path | None) -> bool:
    if staged is None:
        return False
    try:
        a, b = source.lstat(), staged.lstat()
    except OSError:
        return False
    if (a.st_mode, a.st_uid, a.st_gid) != (b.st_mode, b.st_uid, b.st_gid):
        return False
    if stat.S_ISLNK(a.st_mode):
        return os.readlink(source) == os.readlink(staged)
    if stat.S_ISREG(a.st_mode):
        return a.st_size == b.st_size and same_bytes(source, staged)
    return True


def same_bytes(a: Path, b: Path) -> bool:
    try:
        return file_digest(a) == file_digest(b)
    except OSError:
        return False


def unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# --- the head's access log -----------------------------------------------------------------


def access_log_path(layout: Layout) -> Path:
    from qlimage.serve import nginx

    return layout.head_run / nginx.ACCESS_LOG


def read_access_log(layout: Layout, tail: int) -> LogSummary:
    """Each client's newest successful fetch below an image generation, from the log's last
    `tail` bytes. A log that is missing, not a regular file or full of garbage is reported,
    never fatal."""
    path = access_log_path(layout)
    summary = LogSummary(str(path))
    data = read_tail(path, tail, summary)
    if data is None:
        return summary
    prefix = f"/{contract.QLUSTAR_DIR}/{contract.IMAGES_DIR}/"
    for line in data.splitlines():
        if prefix not in line:  # cheap: most requests are bundles, boot files and others
            continue
        note_fetch(line, prefix, summary)
    return summary


def read_tail(path: Path, tail: int, summary: LogSummary) -> str | None:
    """The last `tail` bytes of the log, from its first whole line; not following a link and
    never blocking (a FIFO planted there would)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        summary.problem = f"cannot open: {e.strerror}"
        return None
    summary.exists = True
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            summary.problem = "not a regular file"
            return None
        start = max(0, st.st_size - tail)
        f.seek(start)
        data = f.read(tail)
    summary.read_bytes = len(data)
    if start > 0:  # the first line is cut: start after it
        cut = data.find(b"\n")
        data = data[cut + 1 :] if cut >= 0 else b""
    return data.decode("utf-8", errors="replace")


def note_fetch(line: str, prefix: str, summary: LogSummary) -> None:
    from qlimage.serve import nginx

    try:
        entry = nginx.parse_access(line)
    except QlimageError:
        summary.skipped_lines += 1
        return
    if entry.status not in FETCHED:
        return
    path = unquote(entry.path.split("?", 1)[0])
    if not path.startswith(prefix):
        return
    parts = path[len(prefix) :].split("/")
    if len(parts) < 3 or parts[1] == contract.CURRENT:
        return  # current/generation: asked which, fetched nothing of one yet
    # The log has the raw request URI: a node may spell `..` or escapes that nginx resolved
    # before serving. Only plain names count, and only they reach the admin's terminal.
    if not (PLAIN_NAME.fullmatch(parts[0]) and PLAIN_NAME.fullmatch(parts[1])):
        return
    summary.requests += 1
    last = summary.fetches.get(entry.address)
    if last is None or entry.time >= last.time:
        summary.fetches[entry.address] = Fetch(parts[0], parts[1], entry.time, entry.path)


def node_status(
    site: Site, host: Host, current: Mapping[str, str | None], log: LogSummary
) -> dict[str, Any]:
    image = image_of(site, host)
    address = site.boot_address(host)
    fetch = log.fetches.get(address)
    stale: bool | None = None
    if fetch is not None:
        stale = (fetch.image, fetch.generation) != (image, current.get(image))
    return {
        "name": host.name,
        "mac": host.mac,
        "address": address,
        "bootconfig": host.bootconfig,
        "image": image,
        "current_generation": current.get(image),
        "last_fetch": None
        if fetch is None
        else {
            "image": fetch.image,
            "generation": fetch.generation,
            "time": fetch.time,
            "uri": fetch.uri,
        },
        "stale": stale,
    }


# --- the table -----------------------------------------------------------------------------

SHORT = 16  # checksum prefixes in the table (`--json` has them whole); generation names fit


def short(value: str | None) -> str:
    return value[:SHORT] if value else "-"


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # not reached


def yes_no(value: bool | None) -> str:
    return "?" if value is None else ("yes" if value else "no")


def when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def render_table(status: Mapping[str, Any]) -> str:
    out = [f"site {status['site']}"]
    if status["build_running"]:
        out.append("a build is running (or was killed: the next build cleans up)")
    if status["apt_hook_pending"]:
        out.append("the apt hook changed the module pool: images not rebuilt yet")
    out += ["", *boot_lines(status["boot"]), "", *image_lines(status["images"])]
    out += ["", *node_lines(status["nodes"], status["access_log"])]
    return "\n".join(out) + "\n"


def edited_mark(edit: Mapping[str, Any] | None) -> str:
    return "no" if edit is None else "yes"


def boot_lines(boot: Mapping[str, Any]) -> list[str]:
    rows = [
        ["BOOT", "GENERATION", "KERNEL", "INITRD", "HAND-EDITED", "REBUILD"],
        [
            "kernel+initrd",
            short(boot["generation"]),
            human_size(boot["kernel_size"]),
            human_size(boot["initrd_size"]),
            edited_mark(boot["hand_edit"]),
            yes_no(boot["rebuild_pending"]),
        ],
    ]
    return table(rows) + [f"  why: {r}" for r in boot["reasons"]]


def image_lines(images: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = [["IMAGE", "GENERATION", "SHA256", "SIZE", "HAND-EDITED", "REBUILD", "NODES"]]
    rows += [
        [
            i["name"],
            short(i["generation"]),
            short(i["sha256"]),
            human_size(i["size"]),
            edited_mark(i["hand_edit"]),
            yes_no(i["rebuild_pending"]),
            str(len(i["nodes"])),
        ]
        for i in images
    ]
    lines = table(rows)
    for i in images:
        lines.append(f"{i['name']}:")
        lines.append(f"  modules published: {module_list(i['modules']['published'])}")
        lines.append(f"  modules resolved now: {module_list(i['modules']['resolved'])}")
        if i["boot_test"]:
            test = i["boot_test"]
            lines.append(f"  boot test: passed with {test.get('node')} in {test.get('seconds')} s")
        lines += [f"  why rebuild: {r}" for r in i["reasons"]]
    return lines


def module_list(modules: Sequence[Mapping[str, str]] | None) -> str:
    if modules is None:
        return "-"
    return ", ".join(f"{m['module']} {m['version']}" for m in modules) or "(none)"


def node_lines(nodes: Sequence[Mapping[str, Any]], log: Mapping[str, Any]) -> list[str]:
    if log["problem"]:
        head = f"access log {log['path']}: {log['problem']}"
    elif not log["exists"]:
        head = f"no access log ({log['path']}): last fetches unknown"
    else:
        head = (
            f"access log {log['path']}: {log['requests']} image request(s) in its last "
            f"{human_size(log['read_bytes'])}"
        )
        if log["skipped_lines"]:
            head += f", {log['skipped_lines']} unreadable line(s) skipped"
    rows = [["NODE", "IMAGE", "ADDRESS", "CURRENT", "LAST FETCHED", "AT (UTC)", "STALE"]]
    for n in nodes:
        fetch = n["last_fetch"]
        fetched = "-"
        if fetch is not None:
            fetched = short(fetch["generation"])
            if fetch["image"] != n["image"]:
                fetched = f"{fetch['image']}/{fetched}"
        rows.append(
            [
                n["name"],
                n["image"],
                n["address"],
                short(n["current_generation"]),
                fetched,
                when(fetch["time"]) if fetch else "-",
                "-" if n["stale"] is None else ("STALE" if n["stale"] else "no"),
            ]
        )
    return [head, *table(rows)]
