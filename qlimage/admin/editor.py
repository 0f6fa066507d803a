"""Files of the site's trees edited in the admin's editor: overlay copy trees
(`overlays/common/copy`, `overlays/<image>/copy`) and Root FS Customization configs
(`rootfs/<config>`), as the seed's `qlustar-image-edit -e` and `-r -e|-d` do.

A path names a file inside its tree as the node sees it (`/etc/motd`). It is checked by spelling
first (no `..`, `.`, `//`, control characters) and then against the links the tree holds: a link
is followed only where the head's own lookup and the tree's (trees.resolve_in_root) agree, so
neither the editor nor the rename can ever reach a file outside the tree.

The editor edits a copy in a temporary directory beside the target (same file name, so it picks
its syntax by name), under the build lock: no build reads the tree half-edited, and no build sees
the temporary copy. The copy is renamed in only when its bytes changed, so an unchanged file
leaves the tree, and so every output, as it was.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from qlimage.atomic import TMP_PREFIX
from qlimage.errors import QlimageError
from qlimage.image.overlays import COMMON
from qlimage.image.publish import build_lock
from qlimage.site import Site
from qlimage.trees import remove_in_root, resolve_in_root

# Debian's sensible-editor order once VISUAL and EDITOR are unset or empty.
FALLBACK_EDITORS = ("sensible-editor", "editor", "nano", "vi")
NEW_FILE_MODE = 0o644
# The node runner runs only the executables of this directory (node/runner/actions.py): a script
# created there must be one.
INIT_D = "lib/qlustar/init.d/"
SCRIPT_MODE = 0o755
DIR_MODE = 0o755
COPY = "copy"


@dataclass(frozen=True)
class Tree:
    """A tree whose files the admin edits: `root` is `/` of the node's view, `label` names it
    in messages (`overlays/common/copy`)."""

    root: Path
    label: str


@dataclass(frozen=True)
class Outcome:
    """What an edit or a deletion did: `changed` is False when the tree is as it was."""

    path: Path
    changed: bool
    rebuilt: int | None  # the build's status; None: no build ran


# --- choosing the editor --------------------------------------------------------------------


def editor_command(env: Mapping[str, str], which: Callable[[str], str | None]) -> list[str]:
    """The editor as sensible-editor picks it: $VISUAL, $EDITOR (each may carry arguments,
    `emacs -nw`), then the first of FALLBACK_EDITORS installed."""
    for name in ("VISUAL", "EDITOR"):
        value = env.get(name, "").strip()
        if value:
            try:
                words = shlex.split(value)
            except ValueError as e:
                raise QlimageError(f"${name} {value!r}: cannot split into words: {e}") from None
            if words:
                return words
    for name in FALLBACK_EDITORS:
        path = which(name)
        if path:
            return [path]
    raise QlimageError(
        "no editor: $VISUAL and $EDITOR are unset and none of "
        + ", ".join(FALLBACK_EDITORS)
        + " is installed",
        hint="set EDITOR, e.g. EDITOR=nano",
    )


def run_editor(command: list[str], path: Path) -> int:
    """Run the editor on `path` on the admin's terminal (standard streams inherited) and
    return its exit status."""
    from qlimage.run import spawn

    with spawn([*command, path], stdin=None, stdout=None, stderr=None) as proc:
        return proc.wait()


# --- paths inside a tree --------------------------------------------------------------------


def check_spelling(rel: str) -> list[str]:
    """The components of `rel` (a path inside a tree, one leading `/` allowed), or
    QlimageError for a spelling that could mean anything but one file below the root."""
    shown = repr(rel)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in rel):
        raise QlimageError(f"path {shown}: control characters are not allowed in a path")
    if "//" in rel:
        raise QlimageError(f"path {shown}: '//' is not allowed; write each directory once")
    parts = rel.removeprefix("/").split("/")
    if parts == [""]:
        raise QlimageError(f"path {shown}: names no file (e.g. /etc/motd)")
    if parts[-1] == "":
        raise QlimageError(f"path {shown}: names a directory; name a file (e.g. /etc/motd)")
    if any(p in (".", "..") for p in parts):
        raise QlimageError(f"path {shown}: '.' and '..' components are not allowed")
    if any(p.startswith(TMP_PREFIX) for p in parts):
        raise QlimageError(f"path {shown}: names starting {TMP_PREFIX!r} are reserved")
    return parts


def check_links(tree: Tree, parts: list[str]) -> Path:
    """Where the file `parts` names is on the head, with every link on the way checked: the
    head's lookup (os.path.realpath) must land where the tree's own lookup does (links meaning
    paths of the node's root), so an absolute link or one climbing out of the tree is
    refused. The file and its parents may be missing."""
    real_root = Path(os.path.realpath(tree.root))
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        here = tree.root / prefix
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            break  # the rest is missing: no link on the way
        if stat.S_ISLNK(st.st_mode):
            check_link(tree, prefix, real_root)
        elif i < len(parts) and not stat.S_ISDIR(st.st_mode):
            raise QlimageError(f"{tree.label}/{prefix}: not a directory")
    return Path(os.path.realpath(tree.root / "/".join(parts)))


def check_link(tree: Tree, prefix: str, real_root: Path) -> None:
    seen_by_head = Path(os.path.realpath(tree.root / prefix))
    leads_out = QlimageError(
        f"{tree.label}/{prefix}: a link to {os.readlink(tree.root / prefix)!r}"
        f" leads out of {tree.label}; edit the file it means by its own path"
    )
    if not seen_by_head.is_relative_to(real_root):
        raise leads_out
    try:
        in_tree = Path(os.path.realpath(resolve_in_root(tree.root, prefix, follow=True)))
    except OSError as e:
        raise QlimageError(f"{tree.label}/{prefix}: cannot follow link: {e.strerror}") from None
    if seen_by_head != in_tree:
        raise leads_out


def locate(tree: Tree, rel: str) -> Path:
    """The head path of the file `rel` names in `tree` (checked, see module doc); QlimageError
    when it is not a place for a regular file."""
    target = check_links(tree, check_spelling(rel))
    with contextlib.suppress(FileNotFoundError):
        st = target.lstat()
        if stat.S_ISDIR(st.st_mode):
            raise QlimageError(f"{tree.label}/{rel.removeprefix('/')}: is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise QlimageError(f"{tree.label}/{rel.removeprefix('/')}: not a regular file")
    return target


def require_real_dir(path: Path, what: str) -> None:
    """A tree's own directories (`overlays/<image>`, `copy`, `rootfs/<config>`) must be real
    directories if they exist: the tree's root is never a link to somewhere else."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISDIR(path.lstat().st_mode):
            raise QlimageError(f"{path}: {what} must be a directory, not a link or file")


# --- overlays -------------------------------------------------------------------------------


def overlay_tree(site: Site, image: str | None) -> Tree:
    """overlays/common/copy (image None) or overlays/<image>/copy of a known image."""
    if image is not None and image not in site.images:
        known = ", ".join(sorted(site.images)) or "none"
        raise QlimageError(f"no image {image!r} in {site.paths.images} (known: {known})")
    layer = site.paths.overlays / (image or COMMON)
    for path in (site.paths.overlays, layer, layer / COPY):
        require_real_dir(path, "an overlay directory")
    return Tree(layer / COPY, f"overlays/{image or COMMON}/{COPY}")


# --- editing and deleting -------------------------------------------------------------------


def new_file_mode(rel: str) -> int:
    return SCRIPT_MODE if rel.removeprefix("/").startswith(INIT_D) else NEW_FILE_MODE


def make_parents(target: Path) -> list[Path]:
    """Create the missing directories above `target` (mode 0755; the tree's own root among
    them when the tree is new); returns those created, outermost first, so an abandoned edit
    can take them back."""
    missing = []
    parent = target.parent
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    for d in reversed(missing):
        d.mkdir()
        os.chmod(d, DIR_MODE)
    return list(reversed(missing))


def remove_created(created: list[Path]) -> None:
    """Take back directories an abandoned edit created: an empty directory in an overlay would
    still enter the image."""
    for d in reversed(created):
        with contextlib.suppress(OSError):
            d.rmdir()


def remove_stale_copies(directory: Path) -> None:
    """Temporary copies left by an edit that was killed (we hold the lock: none is in use)."""
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.name.startswith(TMP_PREFIX):
                remove_in_root(entry)


@contextlib.contextmanager
def scratch_copy(target: Path, original: bytes | None) -> Iterator[Path]:
    """A private copy (0600, the original may be a secret) of `target` in a temporary directory
    beside it, under the same name; absent for a new file, so that an editor quitting without
    saving creates nothing."""
    work = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}edit.", dir=target.parent))
    try:
        os.chmod(work, 0o700)
        copy = work / target.name
        if original is not None:
            fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(original)
        yield copy
    finally:
        shutil.rmtree(work, ignore_errors=True)


def edited_bytes(copy: Path) -> bytes | None:
    """What the editor left: None when it removed the copy or never wrote one, or left
    something that is not a regular file (nothing the tree can take)."""
    try:
        st = copy.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return copy.read_bytes()


def install_copy(copy: Path, target: Path, mode: int, owner: tuple[int, int]) -> None:
    """Rename the edited copy onto the target, with the target's mode and owner (a new file's:
    `mode` and ours); the copy is rewritten as a fresh file first, so whatever the editor made
    of it (a link, extra hard links) does not travel."""
    data = copy.read_bytes()
    fresh = copy.with_name(f"{TMP_PREFIX}install")  # a name no editor leaves beside the copy
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        os.fchown(fd, *owner)
        os.fchmod(fd, mode)  # after chown, which clears setuid
    os.replace(fresh, target)


class EditorFailed(QlimageError):
    """The editor exited non-zero: the admin abandoned the edit, nothing changed."""

    exit_status = 1


def edit_file(tree: Tree, rel: str, editor: list[str]) -> tuple[Path, bool]:
    """Edit the file `rel` names in `tree` in `editor`; (head path, whether it changed).
    Call under the build lock. An editor exiting non-zero changes nothing (EditorFailed)."""
    target = locate(tree, rel)
    try:
        original: bytes | None = target.read_bytes()
        st = target.stat()
        mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
    except FileNotFoundError:
        original, mode, owner = None, new_file_mode(rel), (os.getuid(), os.getgid())
    created = make_parents(target)
    changed = False
    try:
        remove_stale_copies(target.parent)
        with scratch_copy(target, original) as copy:
            status = run_editor(editor, copy)
            if status != 0:
                raise EditorFailed(
                    f"{editor[0]} exited with status {status}:"
                    f" {tree.label}/{rel.removeprefix('/')} left as it was"
                )
            edited = edited_bytes(copy)
            changed = edited is not None and edited != original
            if changed:
                install_copy(copy, target, mode, owner)
    finally:
        if not changed:
            remove_created(created)
    return target, changed


def delete_file(tree: Tree, rel: str) -> Path:
    """Remove the file `rel` names in `tree` (its directories stay). Call under the lock."""
    target = locate(tree, rel)
    if not os.path.lexists(target):
        raise QlimageError(f"{tree.label}/{rel.removeprefix('/')}: no such file")
    target.unlink()
    return target


# --- the commands' common frame: the lock, then the rebuild -----------------------------------


def rebuild(site: Site, *, wait: bool) -> int:
    from qlimage.tasks.run import run_graph

    return run_graph(site, ["run"], wait=wait)


def edit_in(
    site: Site, tree: Tree, rel: str, *, wait: bool, build: bool, env: Mapping[str, str]
) -> Outcome:
    """Edit a file of `tree` under the build lock and rebuild if it changed (with `build`)."""
    editor = editor_command(env, shutil.which)
    with build_lock(site.paths.bootfiles, wait=wait):
        path, changed = edit_file(tree, rel, editor)
        status = rebuild(site, wait=wait) if changed and build else None
    return Outcome(path, changed, status)


def delete_in(site: Site, tree: Tree, rel: str, *, wait: bool, build: bool) -> Outcome:
    """Delete a file of `tree` under the build lock and rebuild (with `build`)."""
    with build_lock(site.paths.bootfiles, wait=wait):
        path = delete_file(tree, rel)
        status = rebuild(site, wait=wait) if build else None
    return Outcome(path, True, status)
