"""Hand edits of what is served (`qlimage edit -s IMAGE` / `-i IMAGE`, the seed's
`qlustar-image-edit -s/-i`): unpack the image's current squashfs, or the site's current initrd,
into a temporary tree, give the admin a shell there, and publish what the shell leaves as a new
generation, marked hand-edited (`contract.HAND_EDITED`).

Such a generation is not built from inputs, so the task graph keeps it only while the inputs
stay the same: the squashfs task's target is the image's `current` link and its dependency the
staged tree's manifest, neither of which an edit touches, so a plain `qlimage build` leaves the
edit served; any change to the image's inputs (modules, overlays, root password, packing
settings) restages and repacks it from the inputs, replacing the edit (the seed's "edits are
overwritten by module updates"). `qlimage reconfigure IMAGE` forgets the task to reset at once.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qlimage import contract
from qlimage.atomic import TMP_PREFIX, clamp_outputs_below, write_text
from qlimage.errors import QlimageError
from qlimage.image import changelogs, initrd, publish, squashfs
from qlimage.layout import Layout
from qlimage.run import Stopped, run, sigterm_stops, spawn
from qlimage.site import Site
from qlimage.trees import file_digest

PARTS = ("initrd", "squashfs")
# The shell learns where the tree is from this variable too (it may cd away).
EDIT_ROOT_ENV = "QLIMAGE_EDIT_ROOT"
DEFAULT_SHELL = "/bin/sh"


def warn(text: str) -> None:
    print(f"qlimage: {text}", file=sys.stderr)


def tell(text: str) -> None:
    print(text, flush=True)


def shell_edit(site: Site, image: str, part: str, *, wait: bool, build: bool) -> str | None:
    """Let the admin edit `part` of `image` in a shell; publish the result if the shell exits
    with status 0 and the repacked bytes differ. Returns the new generation's name, else None.
    Holds the build lock for the whole session, so no build publishes under the edit."""
    check_request(site, image, part)
    warn_temporary(image, part)
    layout = Layout(site)
    root = layout.boot if part == "initrd" else layout.image_root(image)
    with publish.build_lock(site.paths.bootfiles, wait=wait):
        base = publish.current(root)
        if base is None:
            raise QlimageError(
                f"{root}: no published generation to edit", hint="run `qlimage build` first"
            )
        name = edit_and_publish(site, image, part, base, root)
        if name is not None and build:
            from qlimage.tasks.run import run_graph

            run_graph(site, ["run"], wait=wait)
        elif name is not None:
            tell(f"not rebuilt (--no-build); to rebuild: qlimage -C {site.paths.root} build")
    return name


def check_request(site: Site, image: str, part: str) -> None:
    if image not in site.images:
        known = ", ".join(sorted(site.images)) or "none"
        raise QlimageError(f"unknown image {image!r} (images.d has: {known})")
    if part not in PARTS:
        raise QlimageError(f"unknown part {part!r}: expected one of {', '.join(PARTS)}")


def warn_temporary(image: str, part: str) -> None:
    if part == "initrd":
        warn(
            "the initrd is one per site, shared by every image: "
            f"this edit changes what every node boots, not only {image}'s"
        )
    what = "the initrd" if part == "initrd" else f"image {image}"
    warn(
        f"hand edits are temporary: the next rebuild of {what} from its inputs replaces them "
        f"(`qlustar-image-reconfigure {image}` resets them now)"
    )


def edit_and_publish(site: Site, image: str, part: str, base: Path, root: Path) -> str | None:
    layout = Layout(site)
    # Under bootfiles/: the repacked file is renamed into the generation (one filesystem), and
    # a killed session's tree carries the prefix the next build's stale clean-up removes.
    with scratch_dir(layout.bootfiles) as scratch:
        tree = scratch / "root"
        unpack(part, image, base, tree)
        status = run_shell(tree)
        if status != 0:
            warn(f"the shell exited with status {status}: edit discarded, nothing published")
            return None
        packed = scratch / (contract.INITRD_FILE if part == "initrd" else "image")
        repack(site, part, tree, packed)
        if file_digest(packed) == file_digest(base / served_file(part, image)):
            tell(f"nothing changed in the {part} of generation {base.name}: nothing published")
            return None
        marker = {"part": part, "base": base.name, "image": image}
        # Served trees get the site's epoch as mtime, as the build does (atomic.py).
        clamp_outputs_below([layout.qlustar], site.source_date_epoch)
        name = publish.publish(
            root, lambda gen: fill_generation(part, image, base, packed, marker, gen),
            site.keep_generations,
        )  # fmt: skip
    what = "initrd (every image's)" if part == "initrd" else f"squashfs of image {image}"
    tell(f"{what}: published hand-edited generation {name} (from {base.name})")
    return name


@contextmanager
def scratch_dir(bootfiles: Path) -> Iterator[Path]:
    """A private directory below bootfiles/, removed however the session ends (the shell's
    exit, an error, Ctrl-C; SIGTERM is turned into an exception for that)."""
    bootfiles.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}edit.", dir=bootfiles))
    try:
        with sigterm_stops():
            yield scratch
    except Stopped:
        raise QlimageError("stopped by SIGTERM: edit discarded, nothing published") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def served_file(part: str, image: str) -> str:
    return contract.INITRD_FILE if part == "initrd" else contract.image_file(image)


def unpack(part: str, image: str, base: Path, tree: Path) -> None:
    """The served bytes as a tree at `tree` (absent before), owners and modes kept."""
    source = base / served_file(part, image)
    if part == "squashfs":
        run(["unsquashfs", "-no-progress", "-quiet", "-dest", tree, source])
        return
    tree.mkdir(mode=0o755)
    archive = run(["gzip", "-dc", source], capture=True).stdout
    # --no-absolute-filenames: a member named /x lands in the tree, never on the head.
    run(
        ["cpio", "--extract", "--make-directories", "--preserve-modification-time",
         "--no-absolute-filenames", "--quiet"],
        cwd=tree, input=archive,
    )  # fmt: skip


def run_shell(tree: Path) -> int:
    """$SHELL (else /bin/sh) in the tree, on our terminal; its exit status."""
    shell = os.environ.get("SHELL") or DEFAULT_SHELL
    warn(f"starting {shell} in {tree}: `exit` publishes the edit, `exit 1` (or Ctrl-C) discards it")
    # spawn() starts it in a session of its own: the shell has no job control, and everything it
    # left running is stopped before the tree is packed or removed.
    with spawn([shell], cwd=tree, env={EDIT_ROOT_ENV: str(tree)}, stdin=None) as proc:
        return proc.wait()


def repack(site: Site, part: str, tree: Path, output: Path) -> None:
    """Pack the tree exactly as the pipeline packs that part (same tool, options, epoch)."""
    if part == "initrd":
        initrd.make_cpio(tree, output, site.source_date_epoch)
        return
    squashfs.pack_image(site, tree, output)


def fill_generation(
    part: str, image: str, base: Path, packed: Path, marker: dict[str, str], gen: Path
) -> list[Path]:
    """The new generation: the repacked file, the base's other files, the hand-edited marker.
    Returns the files that name it (as generations.build_image / build_boot do)."""
    edited = gen / served_file(part, image)
    os.replace(packed, edited)
    mark = gen / contract.HAND_EDITED
    write_text(mark, json.dumps(marker, sort_keys=True) + "\n")
    if part == "initrd":
        kernel = gen / contract.KERNEL_FILE
        shutil.copyfile(base / contract.KERNEL_FILE, kernel)
        os.chmod(kernel, 0o644)
        return [kernel, edited, mark]
    checksum = gen / contract.image_sum_file(image)
    write_text(checksum, contract.checksum_line(file_digest(edited), edited.name))
    modules = gen / contract.MODULES_JSON
    shutil.copyfile(base / contract.MODULES_JSON, modules)
    os.chmod(modules, 0o644)
    # The next build from inputs compares its modules with these for the changelogs.
    if (base / changelogs.STATE_DIR).is_dir():
        shutil.copytree(base / changelogs.STATE_DIR, gen / changelogs.STATE_DIR, symlinks=True)
    return [checksum, modules, mark]


def hand_edited(generation: Path | None) -> dict[str, str] | None:
    """The hand-edited marker of a generation, or None for one built from inputs."""
    if generation is None:
        return None
    try:
        data = json.loads((generation / contract.HAND_EDITED).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise QlimageError(f"{generation / contract.HAND_EDITED}: unreadable marker: {e}") from e
    if not isinstance(data, dict):
        raise QlimageError(f"{generation / contract.HAND_EDITED}: not a JSON object")
    return data


def reset_edits(site: Site, images: list[str], *, wait: bool, build: bool) -> list[str]:
    """Rebuild the images among `images` whose current generation is hand-edited from their
    inputs, and the initrd if it is hand-edited (it is every image's): doit forgets their
    packing tasks, so the next run repacks them from the staged trees. Returns the tasks."""
    from qlimage.tasks.run import run_graph

    layout = Layout(site)
    with publish.build_lock(site.paths.bootfiles, wait=wait):
        tasks = [
            f"squashfs:{name}"
            for name in images
            if hand_edited(publish.current(layout.image_root(name)))
        ]
        if hand_edited(publish.current(layout.boot)):
            tasks.append("initrd")
        if tasks:
            run_graph(site, ["forget", *tasks], wait=wait)
        for name in images:
            edited = f"squashfs:{name}" in tasks
            tell(f"image {name}: " + ("hand edits reset" if edited else "not hand-edited"))
        if "initrd" in tasks:
            tell("initrd: hand edits reset (shared by every image)")
        if build:
            run_graph(site, ["run"], wait=wait)
        elif tasks:
            tell(f"not rebuilt (--no-build); to rebuild: qlimage -C {site.paths.root} build")
    return tasks
