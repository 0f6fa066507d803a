"""build_deb: reproducible bytes, control validation, atomic output (real dpkg-deb)."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from qlimage.errors import BuildError, QlimageError
from qlimage.pool.debpack import build_deb, format_control

pytestmark = pytest.mark.tools

EPOCH = 1_700_000_000

CONTROL = {
    "Package": "qlustar-module-core-bookworm",
    "Version": "11.0.0",
    "Architecture": "amd64",
    "Maintainer": "Qlustar Team <admin@example.org>",
    "Description": "core module\n The base of every node image.\n\n Second paragraph.",
}

# (relative path, kind, payload, mode); kind is "dir", "file" or "link".
TREE: list[tuple[str, str, str, int]] = [
    ("etc", "dir", "", 0o755),
    ("etc/hostname", "file", "node\n", 0o644),
    ("etc/shadow", "file", "root:*:1::::::\n", 0o640),
    ("usr", "dir", "", 0o755),
    ("usr/bin", "dir", "", 0o755),
    ("usr/bin/tool", "file", "#!/bin/sh\necho hi\n", 0o755),
    ("usr/bin/alias", "link", "tool", 0o777),
    ("usr/share", "dir", "", 0o755),
    ("usr/share/empty", "dir", "", 0o755),
    ("var", "dir", "", 0o755),
    ("var/lib", "dir", "", 0o700),
]


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def make_tree(root: Path, entries: list[tuple[str, str, str, int]], mtime: int) -> Path:
    """Create `entries` in the given order; modes set explicitly (they are content)."""
    root.mkdir(parents=True)
    for rel, kind, payload, mode in entries:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "dir":
            path.mkdir(exist_ok=True)
            path.chmod(mode)
        elif kind == "file":
            path.write_text(payload)
            path.chmod(mode)
        else:
            path.symlink_to(payload)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(Path(dirpath, name), (mtime, mtime), follow_symlinks=False)
    os.utime(root, (mtime, mtime))
    return root


def data_members(deb: Path) -> list[tarfile.TarInfo]:
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(data.stdout)) as tar:
        return tar.getmembers()


def control_members(deb: Path) -> list[tarfile.TarInfo]:
    data = subprocess.run(["dpkg-deb", "--ctrl-tarfile", deb], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(data.stdout)) as tar:
        return tar.getmembers()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_same_tree_gives_identical_bytes(tmp_path: Path) -> None:
    # Different creation order, mtimes (all after the epoch) and umask at creation and build.
    with umask(0o022):
        tree_a = make_tree(tmp_path / "a", TREE, mtime=EPOCH + 100)
    with umask(0o077):
        tree_b = make_tree(tmp_path / "b", list(reversed(TREE)), mtime=EPOCH + 99_999)
    out_a = tmp_path / "out-a" / "core.deb"
    out_b = tmp_path / "out-b" / "core.deb"

    with umask(0o022):
        build_deb(tree_a, CONTROL, out_a, source_date_epoch=EPOCH)
    with umask(0o077):
        build_deb(tree_b, CONTROL, out_b, source_date_epoch=EPOCH)

    assert out_a.read_bytes() == out_b.read_bytes()
    assert leftovers(out_a.parent) == ["core.deb"]  # temp directory removed


def test_mtimes_clamped_in_archive_but_source_tree_untouched(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", TREE, mtime=EPOCH + 500)
    old = EPOCH - 1000
    os.utime(tree / "etc/hostname", (old, old))
    out = build_deb(tree, CONTROL, tmp_path / "core.deb", source_date_epoch=EPOCH)

    mtimes = {m.name: m.mtime for m in data_members(out)}
    assert mtimes["./etc/hostname"] == old  # older than the epoch: kept
    assert {t for n, t in mtimes.items() if n != "./etc/hostname"} == {EPOCH}
    assert {m.mtime for m in control_members(out)} == {EPOCH}
    # Files are hardlinked, not copied: their inode (and mtime) must stay as the caller left it.
    assert (tree / "usr/bin/tool").stat().st_mtime == EPOCH + 500


def test_archive_content_and_modes(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", TREE, mtime=EPOCH)
    with umask(0o077):
        out = build_deb(
            tree,
            CONTROL,
            tmp_path / "core.deb",
            source_date_epoch=EPOCH,
            extra_control_files={"postinst": b"#!/bin/sh\nexit 0\n", "conffiles": b""},
        )
    members = {m.name: m for m in data_members(out)}
    assert members["."].mode == 0o755  # the node's "/" regardless of the tree's own mode
    assert members["./etc/shadow"].mode == 0o640
    assert members["./var/lib"].mode == 0o700
    assert members["./usr/bin/alias"].linkname == "tool"
    modes = {m.name: m.mode for m in control_members(out)}
    assert modes == {".": 0o755, "./control": 0o644, "./postinst": 0o755, "./conffiles": 0o644}


def test_control_fields_in_given_order(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", TREE, mtime=EPOCH)
    control = {**CONTROL, "Qlustar-Module": "core", "Qlustar-Flavor": "bookworm"}
    out = build_deb(tree, control, tmp_path / "core.deb", source_date_epoch=EPOCH)
    text = subprocess.run(
        ["dpkg-deb", "--info", out, "control"], capture_output=True, text=True, check=True
    ).stdout
    assert text == format_control(control)
    assert [line.split(":")[0] for line in text.splitlines() if line[0] != " "] == list(control)
    assert " .\n Second paragraph." in text


def test_root_owner_group(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root to chown (CI and the test command run as root)")
    tree = make_tree(tmp_path / "tree", TREE, mtime=EPOCH)
    os.chown(tree / "etc/hostname", 1234, 1234)
    plain = build_deb(tree, CONTROL, tmp_path / "plain.deb", source_date_epoch=EPOCH)
    rooted = build_deb(
        tree, CONTROL, tmp_path / "rooted.deb", source_date_epoch=EPOCH, root_owner_group=True
    )
    assert {m.name: m.uid for m in data_members(plain)}["./etc/hostname"] == 1234
    assert {m.uid for m in data_members(rooted)} == {0}


@pytest.mark.parametrize(
    "field", ["Package", "Version", "Architecture", "Maintainer", "Description"]
)
def test_missing_required_field(tmp_path: Path, field: str) -> None:
    tree = make_tree(tmp_path / "tree", TREE, mtime=EPOCH)
    control = {k: v for k, v in CONTROL.items() if k != field}
    with pytest.raises(ValueError, match=field):
        build_deb(tree, control, tmp_path / "out" / "core.deb", source_date_epoch=EPOCH)
    assert not (tmp_path / "out" / "core.deb").exists()


def test_empty_required_field(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", TREE, mtime=EPOCH)
    with pytest.raises(ValueError, match="Maintainer"):
        build_deb(tree, {**CONTROL, "Maintainer": " "}, tmp_path / "x.deb", source_date_epoch=1)


def test_debian_dir_in_tree_rejected(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", TREE, mtime=EPOCH)
    (tree / "DEBIAN").mkdir()
    with pytest.raises(ValueError, match="DEBIAN"):
        build_deb(tree, CONTROL, tmp_path / "core.deb", source_date_epoch=EPOCH)


def test_output_inside_tree_rejected(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", TREE, mtime=EPOCH)
    with pytest.raises(ValueError, match="inside"):
        build_deb(tree, CONTROL, tree / "var" / "core.deb", source_date_epoch=EPOCH)


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: {**c, "Version": "not a version!"},
        lambda c: {**c, "Package": "Bad_Name"},
    ],
)
def test_failing_dpkg_deb_leaves_nothing(
    tmp_path: Path, breakage: Callable[[dict[str, str]], dict[str, str]]
) -> None:
    tree = make_tree(tmp_path / "tree", TREE, mtime=EPOCH)
    out_dir = tmp_path / "out"
    with pytest.raises(BuildError, match="dpkg-deb") as exc:
        build_deb(tree, breakage(CONTROL), out_dir / "core.deb", source_date_epoch=EPOCH)
    assert isinstance(exc.value, QlimageError)
    assert leftovers(out_dir) == []


def test_failing_dpkg_deb_keeps_previous_output(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", TREE, mtime=EPOCH)
    out = build_deb(tree, CONTROL, tmp_path / "out" / "core.deb", source_date_epoch=EPOCH)
    before = out.read_bytes()
    with pytest.raises(BuildError):
        build_deb(tree, {**CONTROL, "Version": "!"}, out, source_date_epoch=EPOCH)
    assert out.read_bytes() == before
    assert leftovers(out.parent) == ["core.deb"]


def test_format_control_folds_continuation_lines() -> None:
    text = format_control({**CONTROL, "Description": "short\nlong line\n\n  indented"})
    assert text.endswith("Description: short\n long line\n .\n  indented\n")
