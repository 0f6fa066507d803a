"""`qlustar-image-edit -e|-d [IMAGE] PATH` and `-r -e|-d CONFIG PATH`, driven as an admin does:
the installed console script, $QLIMAGE_SITE naming a built site, an EDITOR script.

One built copy of the test site serves the whole module (builds are slow); every test edits
its own paths in it, and only test_overlay_edit_reaches_the_image rebuilds."""

from __future__ import annotations

import os
import pty
import select
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from qlimage.admin.editor import check_spelling, editor_command
from qlimage.errors import QlimageError
from qlimage.layout import Layout

from helpers import clone_built_site, ok, refused, served_listing, tree_listing

EDIT = Path(sys.executable).parent / "qlustar-image-edit"
TIMEOUT = 900  # seconds: a rebuild of the image on a busy machine

# Editor scripts: each gets the path to edit as $1, as sensible-editor passes it.
APPEND = 'printf "%s\\n" "${LINE:-edited}" >> "$1"\n'
UNCHANGED = "exit 0\n"
FAIL = 'echo "half-done" >> "$1"\nexit 1\n'
# Records what it was given: the path, and the copy's mode and size (absent: "-").
RECORD = (
    'echo "$1" >> "$LOG"\n'
    'if [ -e "$1" ]; then stat -c "%a %s" "$1" >> "$LOG"; else echo - >> "$LOG"; fi\n'
    'echo recorded >> "$1"\n'
)


@pytest.fixture(scope="module")
def site(built_site: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the session's built test site for this module."""
    return clone_built_site(built_site, tmp_path_factory.mktemp("edit") / "site")


@pytest.fixture(scope="module")
def editors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    top = tmp_path_factory.mktemp("editors")
    scripts = {}
    for name, body in (
        ("append", APPEND),
        ("unchanged", UNCHANGED),
        ("fail", FAIL),
        ("record", RECORD),
    ):
        path = top / f"{name}.sh"
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
        scripts[name] = path
    return scripts


def edit(
    site: Path, *args: str, editor: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run `qlustar-image-edit ARGS` as the admin would, with EDITOR set to `editor`."""
    full = {k: v for k, v in os.environ.items() if k not in ("VISUAL", "EDITOR")}
    full["QLIMAGE_SITE"] = str(site)
    if editor is not None:
        full["EDITOR"] = str(editor)
    full.update(env)
    return subprocess.run(
        [str(EDIT), *args], env=full, capture_output=True, text=True, timeout=TIMEOUT
    )


def common(site: Path, rel: str) -> Path:
    return site / "overlays/common/copy" / rel


def generation(site: Path) -> tuple[str, str]:
    """The demo image's current generation and history."""
    root = Layout(site / "bootfiles").image_root("demo")
    return os.readlink(root / "current"), (root / "history").read_text()


def no_temporary_copies(top: Path) -> None:
    assert not [p for p in top.rglob("*") if ".qlimage-tmp." in p.name]


# --- the overlay workflow -------------------------------------------------------------------


def test_overlay_edit_reaches_the_image(site: Path, editors: dict[str, Path]) -> None:
    before = generation(site)
    proc = ok(edit(site, "-e", "/etc/qlimage-edit/motd", editor=editors["append"], LINE="hi"))
    assert "overlays/common/copy/etc/qlimage-edit/motd: saved" in proc.stdout
    assert common(site, "etc/qlimage-edit/motd").read_text() == "hi\n"
    assert stat.S_IMODE(common(site, "etc/qlimage-edit").stat().st_mode) == 0o755
    staged = Layout(site / "bootfiles").stage("demo") / "etc/qlimage-edit/motd"
    assert staged.read_text() == "hi\n"
    after = generation(site)
    assert after[0] != before[0], "no new image generation was published"
    image = Layout(site / "bootfiles").image("demo")
    packed = subprocess.run(
        ["unsquashfs", "-cat", str(image), "etc/qlimage-edit/motd"],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert packed.stdout == b"hi\n"


def test_unchanged_edit_publishes_nothing(site: Path, editors: dict[str, Path]) -> None:
    # Created without a build: had the unchanged edit below built anything, this input, newer
    # than the image, would make a new generation.
    ok(edit(site, "--no-build", "-e", "/etc/unchanged.conf", editor=editors["append"]))
    target = common(site, "etc/unchanged.conf")
    stamp = target.stat().st_mtime_ns
    before, served = generation(site), served_listing(site)
    proc = ok(edit(site, "-e", "/etc/unchanged.conf", editor=editors["unchanged"]))
    assert "unchanged, nothing to rebuild" in proc.stdout
    assert generation(site) == before
    assert served_listing(site) == served
    assert target.stat().st_mtime_ns == stamp
    no_temporary_copies(site / "overlays")


def test_running_again_edits_the_same_file_keeping_mode_and_owner(
    site: Path, editors: dict[str, Path]
) -> None:
    ok(edit(site, "--no-build", "-e", "demo", "/etc/twice", editor=editors["append"], LINE="1"))
    target = site / "overlays/demo/copy/etc/twice"
    os.chown(target, 1, 1)
    target.chmod(0o640)
    ok(edit(site, "--no-build", "-e", "demo", "/etc/twice", editor=editors["append"], LINE="2"))
    assert target.read_text() == "1\n2\n"
    st = target.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1, 1)
    assert not common(site, "etc/twice").exists()


def test_the_editor_edits_a_private_copy_beside_the_target(
    site: Path, editors: dict[str, Path], tmp_path: Path
) -> None:
    log = tmp_path / "log"
    target = common(site, "etc/secret.conf")
    ok(edit(site, "--no-build", "-e", "etc/secret.conf", editor=editors["append"], LINE="s"))
    target.chmod(0o600)
    ok(edit(site, "--no-build", "-e", "etc/secret.conf", editor=editors["record"], LOG=str(log)))
    given, mode_size = log.read_text().splitlines()
    assert Path(given).name == "secret.conf"
    assert Path(given).parent.parent == target.parent
    assert mode_size == "600 2"
    assert target.read_text() == "s\nrecorded\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    no_temporary_copies(site / "overlays")


def test_visual_wins_over_editor_and_may_carry_arguments(
    site: Path, editors: dict[str, Path]
) -> None:
    proc = edit(
        site,
        "--no-build",
        "-e",
        "/etc/visual",
        editor=editors["fail"],
        VISUAL=f"sh {editors['append']}",
        LINE="from visual",
    )
    ok(proc)
    assert common(site, "etc/visual").read_text() == "from visual\n"


def test_failing_editor_changes_nothing(site: Path, editors: dict[str, Path]) -> None:
    ok(edit(site, "--no-build", "-e", "/etc/kept", editor=editors["append"], LINE="old"))
    proc = edit(site, "-e", "/etc/kept", editor=editors["fail"])
    assert proc.returncode == 1, proc.stderr
    assert "left as it was" in proc.stderr and "Traceback" not in proc.stderr
    assert common(site, "etc/kept").read_text() == "old\n"
    # A new file in new directories: neither the file nor the directories remain.
    proc = edit(site, "-e", "/opt/new/deep/file", editor=editors["fail"])
    assert proc.returncode == 1, proc.stderr
    assert not common(site, "opt").exists()
    no_temporary_copies(site / "overlays")


def test_new_file_left_unsaved_creates_nothing(site: Path, editors: dict[str, Path]) -> None:
    proc = ok(edit(site, "-e", "demo", "/srv/never/saved", editor=editors["unchanged"]))
    assert "unchanged" in proc.stdout
    assert not (site / "overlays/demo/copy/srv").exists()


def test_delete_undoes_an_edit(site: Path, editors: dict[str, Path]) -> None:
    ok(edit(site, "--no-build", "-e", "/etc/undo-me", editor=editors["append"]))
    proc = ok(edit(site, "--no-build", "-d", "/etc/undo-me"))
    assert "deleted" in proc.stdout and "qlimage -C" in proc.stdout  # how to rebuild
    assert not common(site, "etc/undo-me").exists()
    refused(edit(site, "--no-build", "-d", "/etc/undo-me"), "etc/undo-me", "no such file")


# --- Root FS Customization configs ---------------------------------------------------------


def test_rootfs_edit_and_delete(site: Path, editors: dict[str, Path]) -> None:
    tweaks = site / "rootfs/tweaks"
    ok(edit(site, "--no-build", "-r", "-e", "tweaks", "/etc/issue", editor=editors["append"]))
    assert (tweaks / "etc/issue").read_text() == "edited\n"
    assert stat.S_IMODE((tweaks / "etc/issue").stat().st_mode) == 0o644
    script = "/lib/qlustar/init.d/30-edited"
    ok(edit(site, "--no-build", "-r", "-e", "tweaks", script, editor=editors["append"]))
    # The runner runs only executables there: a new script is one.
    assert stat.S_IMODE((tweaks / script[1:]).stat().st_mode) == 0o755
    ok(edit(site, "--no-build", "-r", "-d", "tweaks", "/etc/issue"))
    assert not (tweaks / "etc/issue").exists()
    assert (tweaks / "etc").is_dir()


# --- bad input: one line, status 2, nothing touched ---------------------------------------


@pytest.mark.parametrize(
    ("args", "names"),
    [
        ((), "one of -e, -d"),
        (("-e", "-d", "/etc/x"), "-e and -d"),
        (("-e", "demo", "/etc/x", "/etc/y"), "[IMAGE] PATH"),
        (("-r", "-e", "/etc/x"), "CONFIG PATH"),
        (("-s", "demo", "/etc/x"), "-s IMAGE"),
        (("-r", "-i", "demo"), "-i IMAGE"),
        (("-e", "nope", "/etc/x"), "'nope'"),
        (("-r", "-e", "nope", "/etc/x"), "'nope'"),
        (("-r", "-e", "Bad", "/etc/x"), "'Bad'"),
        (("-r", "-d", "../tweaks", "/etc/x"), "'../tweaks'"),
        (("-r", "-e", "tweaks\n", "/etc/x"), "expected a name"),
    ],
)
def test_bad_arguments(
    site: Path, editors: dict[str, Path], tmp_path: Path, args: tuple[str, ...], names: str
) -> None:
    marker = tmp_path / "ran"
    spy = tmp_path / "spy.sh"
    spy.write_text(f"#!/bin/sh\ntouch {marker}\n")
    spy.chmod(0o755)
    before = tree_listing(site / "overlays"), tree_listing(site / "rootfs")
    refused(edit(site, "--no-build", *args, editor=spy), names)
    assert not marker.exists()
    assert (tree_listing(site / "overlays"), tree_listing(site / "rootfs")) == before


def test_unknown_image_lists_the_known_ones(site: Path, editors: dict[str, Path]) -> None:
    line = refused(edit(site, "-e", "nope", "/etc/x", editor=editors["append"]), "'nope'")
    assert "known: demo" in line
    line = refused(edit(site, "-r", "-e", "nope", "/x", editor=editors["append"]), "'nope'")
    assert "known: tweaks" in line


def test_no_editor_at_all(site: Path, tmp_path: Path) -> None:
    line = refused(edit(site, "-e", "/etc/x", PATH=str(tmp_path)), "no editor")
    assert "EDITOR" in line
    assert not common(site, "etc/x").exists()


ESCAPES = [
    "../outside",
    "/../etc/passwd",
    "etc/../../x",
    "//etc/x",
    "/etc//x",
    "/etc/./x",
    "/",
    "",
    "etc/",
    "etc/\x01x",
    "etc/x\n",
    "etc/\x7f",
    "/etc/.qlimage-tmp.edit.x/motd",
]


@pytest.mark.parametrize("path", ESCAPES)
@pytest.mark.parametrize("where", ["common", "image", "rootfs-edit", "rootfs-delete"])
def test_path_spellings_are_refused(
    site: Path, tmp_path: Path, sentinel: Path, path: str, where: str
) -> None:
    marker = tmp_path / "ran"
    spy = tmp_path / "spy.sh"
    spy.write_text(f"#!/bin/sh\ntouch {marker}\n")
    spy.chmod(0o755)
    args = {
        "common": ("-e", path),
        "image": ("-e", "demo", path),
        "rootfs-edit": ("-r", "-e", "tweaks", path),
        "rootfs-delete": ("-r", "-d", "tweaks", path),
    }[where]
    before = tree_listing(site / "overlays"), tree_listing(site / "rootfs")
    refused(edit(site, "--no-build", *args, editor=spy), "path")
    assert not marker.exists()
    assert (tree_listing(site / "overlays"), tree_listing(site / "rootfs")) == before


def test_nul_in_a_path_is_refused() -> None:
    # execve cannot pass a NUL in an argument; the check itself still refuses one.
    with pytest.raises(QlimageError, match="control characters"):
        check_spelling("etc/x\x00y")


@pytest.mark.parametrize(
    ("link", "points_to", "path"),
    [
        ("out", "{sentinel}/dir", "/out/file"),  # a directory link out of the tree
        ("etc/stolen", "{sentinel}/secret", "/etc/stolen"),  # the file itself a link out
        ("up", "../../../../../../../../..{sentinel}", "/up/secret"),  # climbing out
        ("abs", "/etc", "/abs/motd"),  # absolute: the node's /etc, not the head's
    ],
)
@pytest.mark.parametrize("where", ["common", "rootfs-edit", "rootfs-delete"])
def test_links_leading_out_are_refused(
    site: Path,
    editors: dict[str, Path],
    sentinel: Path,
    link: str,
    points_to: str,
    path: str,
    where: str,
) -> None:
    tree = site / ("overlays/common/copy" if where == "common" else "rootfs/tweaks")
    (tree / link).parent.mkdir(parents=True, exist_ok=True)
    (tree / link).symlink_to(points_to.format(sentinel=sentinel))
    args = {
        "common": ("-e", path),
        "rootfs-edit": ("-r", "-e", "tweaks", path),
        "rootfs-delete": ("-r", "-d", "tweaks", path),
    }[where]
    outside, head_motd = tree_listing(sentinel), head_file("/etc/motd")
    try:
        proc = edit(site, "--no-build", *args, editor=editors["append"])
        refused(proc, link, "leads out")
        assert tree_listing(sentinel) == outside
        assert head_file("/etc/motd") == head_motd
        no_temporary_copies(tree)
    finally:
        (tree / link).unlink()


def head_file(path: str) -> bytes | None:
    return Path(path).read_bytes() if os.path.lexists(path) else None


def test_links_inside_the_tree_are_followed(site: Path, editors: dict[str, Path]) -> None:
    tree = site / "overlays/common/copy"
    (tree / "etc").mkdir(parents=True, exist_ok=True)
    (tree / "etc/real.conf").write_text("real\n")
    (tree / "etc/alias.conf").symlink_to("real.conf")
    ok(edit(site, "--no-build", "-e", "/etc/alias.conf", editor=editors["append"]))
    assert (tree / "etc/alias.conf").is_symlink()
    assert (tree / "etc/real.conf").read_text() == "real\nedited\n"


def test_a_directory_is_not_a_file(site: Path, editors: dict[str, Path]) -> None:
    refused(edit(site, "-r", "-e", "tweaks", "/lib/qlustar", editor=editors["append"]), "directory")


# --- the editor's choice, as sensible-editor makes it ---------------------------------------


def test_editor_choice_order() -> None:
    def which(installed: set[str]) -> Callable[[str], str | None]:
        return lambda name: f"/usr/bin/{name}" if name in installed else None

    assert editor_command({"VISUAL": "vim -f", "EDITOR": "nano"}, which(set())) == ["vim", "-f"]
    assert editor_command({"VISUAL": " ", "EDITOR": "nano"}, which(set())) == ["nano"]
    everything = which({"sensible-editor", "editor", "nano", "vi"})
    assert editor_command({}, everything) == ["/usr/bin/sensible-editor"]
    assert editor_command({}, which({"nano", "vi"})) == ["/usr/bin/nano"]
    assert editor_command({}, which({"vi"})) == ["/usr/bin/vi"]
    with pytest.raises(QlimageError, match="no editor"):
        editor_command({}, which(set()))
    with pytest.raises(QlimageError, match="EDITOR"):
        editor_command({"EDITOR": "vim 'unclosed"}, which(set()))


@pytest.mark.parametrize("flag", ["-i", "-s"])
def test_shell_edits_go_to_the_hand_editor(site: Path, flag: str) -> None:
    # The wiring only: admin/handedit.py checks the image before any shell starts.
    refused(edit(site, "--no-build", flag, "nope", SHELL="/bin/false"), "'nope'")


# --- a real editor on a real terminal ------------------------------------------------------

VIM = "vim -u NONE -i NONE -N -n"  # no vimrc, viminfo or swap file: the same vim everywhere
SCREEN_WAIT = 60.0  # seconds: the longest vim may take to show the file


def edit_in_vim(site: Path, rel: str, keys: bytes) -> tuple[int, bytes]:
    """`qlustar-image-edit --no-build -e REL` with EDITOR=vim on a pseudo-terminal: once vim
    shows the file, type `keys`; returns (status, everything the terminal showed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VISUAL", "EDITOR")}
    env.update(QLIMAGE_SITE=str(site), EDITOR=VIM, TERM="xterm")
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [str(EDIT), "--no-build", "-e", rel],
            env=env,
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
        )
        os.close(terminal)
        shown = read_terminal(controller, until=Path(rel).name.encode())
        os.write(controller, keys)
        shown += read_terminal(controller, until=None)
        return proc.wait(timeout=SCREEN_WAIT), shown
    finally:
        os.close(controller)


def read_terminal(fd: int, until: bytes | None) -> bytes:
    """What the terminal shows until `until` appears (None: until it closes), bounded."""
    deadline = time.monotonic() + SCREEN_WAIT
    data = b""
    while until is None or until not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"terminal stalled: {data[-500:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every process holding the terminal has ended
            chunk = b""
        if not chunk:
            assert until is None, f"the terminal closed before {until!r}: {data[-500:]!r}"
            break
        data += chunk
    return data


def test_real_vim_on_a_terminal(site: Path) -> None:
    target = common(site, "etc/vim.conf")
    code, shown = edit_in_vim(site, "/etc/vim.conf", b":$put ='typed in vim'\r:wq\r")
    assert code == 0, shown[-500:]
    assert b"etc/vim.conf: saved" in shown
    assert target.read_text() == "\ntyped in vim\n"
    # :cq quits with an error status: the change typed before it is thrown away.
    code, shown = edit_in_vim(site, "/etc/vim.conf", b":$put ='thrown away'\r:w\r:cq\r")
    assert code == 1, shown[-500:]
    assert target.read_text() == "\ntyped in vim\n"
    no_temporary_copies(site / "overlays")


def test_help(site: Path) -> None:
    proc = ok(edit(site, "--help"))
    for option in ("-e", "-d", "-r", "-i IMAGE", "-s IMAGE", "--no-build", "[IMAGE] PATH"):
        assert option in proc.stdout, option
