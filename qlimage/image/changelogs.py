"""The image's changelogs under /usr/share/doc/qlustar-image (seed: "Changelogs").

  core.changelog.gz                the core module's Debian changelog
  <module>.packages.version.gz     the Debian packages (and versions) the module is made of
  <module>.contents.changelog.gz   files added, removed and changed since the previous version
  <module>.packages.changelog.gz   packages added, removed, upgraded and downgraded

"Previous" is what the image's current generation was built from: each generation keeps the
state (file list and package list of each module) the next build compares with.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from debian.debian_support import Version

from qlimage.atomic import write_text
from qlimage.pool.packages import ModulePackage, module_changelog
from qlimage.pool.recipes import PACKAGES_LIST
from qlimage.trees import manifest, read_in_root

DOC_DIR = "usr/share/doc/qlustar-image"
STATE_DIR = "state"


@dataclass(frozen=True)
class ModuleState:
    module: str
    version: str
    files: str  # trees.manifest of the module's tree
    packages: str  # "name version" lines
    changelog: str = ""  # the module's Debian changelog (not kept in a generation's state)


def module_state(module: ModulePackage, tree: Path) -> ModuleState:
    """What the changelogs need of an unpacked module. The file list and the changelog are
    computed once per unpacked module version and kept beside its tree (see stage.py)."""
    # Read inside the module's tree only: the list (or a directory above it) may be a link.
    packages = read_in_root(tree, PACKAGES_LIST.format(module=module.module))
    files = tree.with_name(tree.name + ".files")
    if not files.exists():
        write_text(files, manifest(tree))
    changelog = tree.with_name(tree.name + ".changelog")
    if not changelog.exists():
        write_text(changelog, module_changelog(module.path) or "")
    return ModuleState(
        module.module,
        module.version,
        files.read_text(),
        "" if packages is None else packages.decode("utf-8", "replace"),
        changelog.read_text(),
    )


def save_state(states: Sequence[ModuleState], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for s in states:
        for kind, text in (("files", s.files), ("packages", s.packages)):
            path = directory / f"{s.module}.{kind}"
            path.write_text(text)
            written.append(path)
    versions = {s.module: s.version for s in states}
    (directory / "versions.json").write_text(json.dumps(versions, indent=2, sort_keys=True) + "\n")
    return [*written, directory / "versions.json"]


def load_state(directory: Path | None) -> dict[str, ModuleState]:
    if directory is None or not (directory / "versions.json").exists():
        return {}
    versions = json.loads((directory / "versions.json").read_text())
    out = {}
    for module, version in versions.items():
        files = directory / f"{module}.files"
        packages = directory / f"{module}.packages"
        out[module] = ModuleState(
            module,
            version,
            files.read_text() if files.exists() else "",
            packages.read_text() if packages.exists() else "",
        )
    return out


def by_path(manifest_text: str) -> dict[str, str]:
    """Manifest lines keyed by path: {path: "mode owner digest-or-target"}."""
    out = {}
    for line in manifest_text.splitlines():
        mode, owner, what, path = line.split("\t", 3)
        out[path] = f"{mode} {owner} {what}"
    return out


def contents_changelog(cur: ModuleState, prev: ModuleState | None) -> str:
    head = f"{cur.module} module {cur.version}: contents"
    if prev is None:
        return f"{head}: first build of this image, no previous generation to compare with\n"
    lines = [f"{head} compared with {prev.version}"]
    if prev.files == cur.files:
        # The usual rebuild (the module did not change): one string comparison instead of
        # two path tables of tens of thousands of entries, on the way to every pack.
        return "\n".join([*lines, "no files added, removed or changed"]) + "\n"
    old, new = by_path(prev.files), by_path(cur.files)
    lines += [f"added    /{p}" for p in sorted(new.keys() - old.keys())]
    lines += [f"removed  /{p}" for p in sorted(old.keys() - new.keys())]
    lines += [f"changed  /{p}" for p in sorted(old.keys() & new.keys()) if old[p] != new[p]]
    if len(lines) == 1:
        lines.append("no files added, removed or changed")
    return "\n".join(lines) + "\n"


def parse_packages(text: str) -> dict[str, str]:
    """{name: version} of "name version" lines; a line without a version is left out."""
    pairs = (line.split(None, 1) for line in text.splitlines())
    return {p[0]: p[1].strip() for p in pairs if len(p) == 2}


def version_order(old: str, new: str) -> int:
    """1 upgraded, -1 downgraded, 0 same; a version Debian cannot parse (the list is the
    module's own data) counts as an upgrade when it differs."""
    try:
        a, b = Version(old), Version(new)
    except ValueError:
        return 0 if old == new else 1
    return (b > a) - (b < a)


def packages_changelog(cur: ModuleState, prev: ModuleState | None) -> str:
    head = f"{cur.module} module {cur.version}: packages"
    if prev is None:
        return f"{head}: first build of this image, no previous generation to compare with\n"
    old, new = parse_packages(prev.packages), parse_packages(cur.packages)
    lines = [f"{head} compared with {prev.version}"]
    for name in sorted(new.keys() | old.keys()):
        if name not in old:
            lines.append(f"added       {name} {new[name]}")
        elif name not in new:
            lines.append(f"removed     {name} {old[name]}")
        elif (order := version_order(old[name], new[name])) > 0:
            lines.append(f"upgraded    {name} {old[name]} -> {new[name]}")
        elif order < 0:
            lines.append(f"downgraded  {name} {old[name]} -> {new[name]}")
    if len(lines) == 1:
        lines.append("no packages added, removed, upgraded or downgraded")
    return "\n".join(lines) + "\n"


def gz(text: str) -> bytes:
    # mtime=0 and no file name in the header: the same text always gives the same bytes.
    return gzip.compress(text.encode(), compresslevel=9, mtime=0)


def render(
    modules: Sequence[ModulePackage],
    states: Mapping[str, ModuleState],
    previous: Mapping[str, ModuleState],
) -> dict[str, bytes]:
    """{file name in DOC_DIR: gzip bytes}."""
    out: dict[str, bytes] = {}
    for m in modules:
        cur = states[m.module]
        prev = previous.get(m.module)
        if m.module == "core":
            text = cur.changelog or "the core module ships no changelog\n"
            out["core.changelog.gz"] = gz(text if text.endswith("\n") else text + "\n")
        out[f"{m.module}.packages.version.gz"] = gz(
            cur.packages or f"{m.module} module {m.version} lists no Debian packages\n"
        )
        out[f"{m.module}.contents.changelog.gz"] = gz(contents_changelog(cur, prev))
        out[f"{m.module}.packages.changelog.gz"] = gz(packages_changelog(cur, prev))
    return out
