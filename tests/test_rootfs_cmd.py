"""`qlimage rootfs new|list|delete`: Root FS Customization configs, driven as an admin does
(the command line; the delete confirmation answered on a real pseudo-terminal).

One built copy of the test site (its beo-01 uses the config `tweaks` through an option set)
serves the module; only test_delete_confirmed_on_a_terminal_and_rebuilt rebuilds."""

from __future__ import annotations

import os
import pty
import select
import stat
import subprocess
import time
from pathlib import Path

import pytest

from helpers import QLIMAGE, REPO, clone_built_site, ok, refused, tree_listing

TIMEOUT = 900  # seconds: a command that rebuilds, on a busy machine
PROMPT_WAIT = 60.0  # seconds: the longest the prompt may take to appear


@pytest.fixture(scope="module")
def site(built_site: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return clone_built_site(built_site, tmp_path_factory.mktemp("rootfs") / "site")


def rootfs(
    site: Path, *args: str, stdin: int | None = subprocess.DEVNULL
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [*QLIMAGE, "-C", str(site), "rootfs", *args],
        env=env,
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def delete_on_terminal(site: Path, name: str, answer: bytes | None) -> tuple[int, str, str]:
    """`rootfs delete NAME` with a pseudo-terminal as its standard input: wait for the prompt
    (on stderr), type `answer` (None: end of input), and return (status, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [*QLIMAGE, "-C", str(site), "rootfs", "delete", name, "--no-build"],
            env=env,
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        os.close(terminal)
        assert proc.stderr is not None
        prompt = read_until(proc.stderr.fileno(), b"[y/N] ")
        os.write(controller, answer if answer is not None else b"\x04")  # ^D: end of input
        out, err = proc.communicate(timeout=TIMEOUT)
        return proc.returncode, out.decode(), (prompt + err).decode()
    finally:
        os.close(controller)


def read_until(fd: int, end: bytes) -> bytes:
    deadline = time.monotonic() + PROMPT_WAIT
    data = b""
    while not data.endswith(end):
        left = deadline - time.monotonic()
        assert left > 0, f"no prompt within {PROMPT_WAIT} s: {data!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            assert chunk, f"the command ended before asking: {data!r}"
            data += chunk
    return data


def test_new_creates_an_empty_config(site: Path) -> None:
    proc = ok(rootfs(site, "new", "gpu", "--no-build"))
    assert "rootfs/gpu: created" in proc.stdout and "qlimage -C" in proc.stdout
    top = site / "rootfs/gpu"
    for d in (top, top / "lib", top / "lib/qlustar", top / "lib/qlustar/init.d"):
        assert d.is_dir() and not d.is_symlink()
        assert stat.S_IMODE(d.stat().st_mode) == 0o755
    assert list((top / "lib/qlustar/init.d").iterdir()) == []
    assert not [p for p in (site / "rootfs").iterdir() if p.name.startswith(".")]
    refused(rootfs(site, "new", "gpu", "--no-build"), "'gpu'", "exists")


@pytest.mark.parametrize("name", ["Bad", "../x", ".hidden", "a/b", "-x", "x y", "x\n", ""])
def test_bad_names_are_refused(site: Path, name: str) -> None:
    before = tree_listing(site / "rootfs")
    for action in ("new", "delete"):
        line = refused(rootfs(site, action, "--no-build", "--", name))
        assert "expected a name of lower-case letters" in line
    assert tree_listing(site / "rootfs") == before


def test_list_shows_configs_and_their_nodes(site: Path) -> None:
    ok(rootfs(site, "new", "unused", "--no-build"))
    lines = ok(rootfs(site, "list")).stdout.splitlines()
    assert any(line.split() == ["tweaks", "beo-01"] for line in lines), lines
    assert any(line.split(None, 1) == ["unused", "(no node)"] for line in lines), lines


def test_delete_is_refused_while_a_node_uses_it(site: Path) -> None:
    before = tree_listing(site / "rootfs/tweaks")
    line = refused(rootfs(site, "delete", "tweaks", "--yes", "--no-build"), "'tweaks'", "beo-01")
    assert "optionset compute" in line  # where the node's rootfs option comes from
    # Refused before any question: a used config is never offered for deletion.
    refused(rootfs(site, "delete", "tweaks", "--no-build"), "'tweaks'", "beo-01")
    assert tree_listing(site / "rootfs/tweaks") == before


def test_delete_of_an_unknown_config_lists_the_known(site: Path) -> None:
    line = refused(rootfs(site, "delete", "nope", "--yes", "--no-build"), "'nope'")
    assert "tweaks" in line


@pytest.mark.parametrize("answer", [b"n\n", b"\n", b"no\n", None, b"maybe\n"])
def test_delete_without_a_yes_keeps_everything(site: Path, answer: bytes | None) -> None:
    if not (site / "rootfs/keep").exists():
        ok(rootfs(site, "new", "keep", "--no-build"))
    (site / "rootfs/keep/etc").mkdir(exist_ok=True)
    (site / "rootfs/keep/etc/issue").write_text("kept\n")
    before = tree_listing(site / "rootfs/keep")
    code, out, err = delete_on_terminal(site, "keep", answer)
    assert code == 2, (out, err)
    assert "not confirmed; nothing deleted" in err
    assert tree_listing(site / "rootfs/keep") == before


def test_delete_without_a_terminal_is_refused(site: Path) -> None:
    ok(rootfs(site, "new", "noterm", "--no-build"))
    refused(rootfs(site, "delete", "noterm", "--no-build"), "no terminal", "--yes")
    assert (site / "rootfs/noterm/lib/qlustar/init.d").is_dir()


def test_delete_confirmed_on_a_terminal_and_rebuilt(site: Path) -> None:
    ok(rootfs(site, "new", "doomed", "--no-build"))
    (site / "rootfs/doomed/etc").mkdir()
    (site / "rootfs/doomed/etc/issue").write_text("bye\n")
    code, out, err = delete_on_terminal(site, "doomed", b"y\n")
    assert code == 0, (out, err)
    assert "Every file and directory under" in err and "rootfs/doomed (1 files)" in err
    assert not (site / "rootfs/doomed").exists()
    assert not [p for p in (site / "rootfs").iterdir() if p.name.startswith(".")]
    # --yes, and a rebuild at the end, which must succeed with the config gone.
    ok(rootfs(site, "new", "doomed2", "--no-build"))
    proc = ok(rootfs(site, "delete", "doomed2", "--yes"))
    assert "rootfs/doomed2: deleted" in proc.stdout and "not rebuilt" not in proc.stdout
    assert not (site / "rootfs/doomed2").exists()


@pytest.mark.parametrize("action", ["new", "delete", "list"])
def test_help(site: Path, action: str) -> None:
    proc = ok(rootfs(site, action, "--help"))
    assert f"qlimage rootfs {action}" in proc.stdout
    assert ("--yes" in proc.stdout) == (action == "delete")
