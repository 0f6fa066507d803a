"""`qlimage reconfigure IMAGE|all` (qlustar-image-reconfigure): an image's own root password
(piped in, or typed twice on a terminal), the head's again, and hand edits reset by rebuilding
the image from its inputs."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import subprocess
import termios
import time
from pathlib import Path

import pytest

from qlimage import contract
from qlimage.image import publish
from qlimage.image.rootpw import read_root_hash
from qlimage.layout import Layout
from qlimage.site import load_site

from helpers import QLIMAGE, REPO, assert_refused, qlimage, served_listing

pytestmark = pytest.mark.tools

PASSWORD = "correct horse battery"


def reconfigure(
    site: Path, *args: str, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """`qlimage reconfigure ARGS` with `input` on its stdin (else /dev/null)."""
    return subprocess.run(
        [*QLIMAGE, "-C", str(site), "reconfigure", *args],
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        timeout=600,
    )


def root_hash_in_image(site: Path) -> str:
    img = Layout(load_site(site)).image("demo")
    shadow = subprocess.run(
        ["unsquashfs", "-cat", str(img), "etc/shadow"], capture_output=True, check=True
    ).stdout.decode()
    return next(line.split(":")[1] for line in shadow.splitlines() if line.startswith("root:"))


def crypt(password: str, setting: str) -> str:
    """libxcrypt's crypt(3), through perl (Python's crypt module is gone in 3.13)."""
    return subprocess.run(
        ["perl", "-e", "print crypt($ARGV[0], $ARGV[1])", password, setting],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def test_password_stdin_then_head_password(built_copy: Path) -> None:
    rootpw = built_copy / "images.d/demo.rootpw"
    proc = reconfigure(built_copy, "demo", "--password-stdin", input=PASSWORD.encode() + b"\n")
    assert proc.returncode == 0, proc.stderr.decode()
    assert oct(rootpw.stat().st_mode & 0o7777) == oct(0o600)
    stored = rootpw.read_text()
    assert stored.startswith("$y$") and stored.endswith("\n") and PASSWORD not in stored
    hash_ = stored.strip()
    assert crypt(PASSWORD, hash_) == hash_  # the hash is of exactly the piped line
    assert crypt(PASSWORD + "\n", hash_) != hash_
    # The rebuilt image's /etc/shadow holds the new hash.
    assert root_hash_in_image(built_copy) == hash_

    proc = reconfigure(built_copy, "demo", "--head-password")
    assert proc.returncode == 0, proc.stderr.decode()
    assert not rootpw.exists()
    assert root_hash_in_image(built_copy) == read_root_hash(load_site(built_copy).head_shadow)


def test_reconfigure_resets_hand_edits(
    built_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The copy's staged tree lost the template's hard links (a copy), so its squashfs differs
    # in bytes from the template's: pack it once, as `base`, the copy's build from its inputs.
    qlimage("-C", str(built_copy), "doit", "forget", "squashfs:demo")
    qlimage("-C", str(built_copy), "build")
    root = Layout(load_site(built_copy)).image_root("demo")
    base = publish.current_name(root)
    assert base is not None
    shell = tmp_path / "shell"
    shell.write_text("#!/bin/sh\necho edited > etc/motd\n")
    shell.chmod(0o755)
    monkeypatch.setenv("SHELL", str(shell))
    qlimage("-C", str(built_copy), "edit", "-s", "demo", "--no-build")
    assert (root / contract.CURRENT / contract.HAND_EDITED).exists()

    proc = reconfigure(built_copy, "all")
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"image demo: hand edits reset" in proc.stdout
    # The image built from the inputs again: the generation it was before the edit.
    assert publish.current_name(root) == base
    assert not (root / contract.CURRENT / contract.HAND_EDITED).exists()
    assert publish.is_verified(root / base)  # what a node checks


def test_unknown_image_is_refused(built_copy: Path) -> None:
    assert_refused(built_copy, "reconfigure", "nosuch", names="unknown image 'nosuch'")
    assert_refused(
        built_copy, "reconfigure", "nosuch", "--head-password", names="unknown image 'nosuch'"
    )


@pytest.mark.parametrize(
    ("data", "names"),
    [
        (b"\n", "empty password"),
        (b"", "empty password"),
        (b"two\nlines\n", "one line"),
        (b"\xff\xfe\n", "not UTF-8"),
    ],
)
def test_bad_piped_password_is_refused(built_copy: Path, data: bytes, names: str) -> None:
    before = served_listing(built_copy)
    proc = reconfigure(built_copy, "demo", "--password-stdin", input=data)
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and names in lines[0], proc.stderr
    assert not (built_copy / "images.d/demo.rootpw").exists()
    assert served_listing(built_copy) == before


def test_password_without_a_terminal_is_refused(built_copy: Path) -> None:
    proc = reconfigure(built_copy, "demo", "--password")  # stdin: /dev/null
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--password-stdin" in lines[0], lines


def test_mismatched_passwords_on_a_terminal_are_refused(built_copy: Path) -> None:
    """Typed on a terminal (a pty that is the command's controlling terminal), without echo."""
    before = served_listing(built_copy)
    master, slave = pty.openpty()

    def take_terminal() -> None:  # after setsid: the pty becomes the controlling terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    with subprocess.Popen(
        [*QLIMAGE, "-C", str(built_copy), "reconfigure", "demo", "--password"],
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        preexec_fn=take_terminal, env=dict(os.environ, PYTHONPATH=str(REPO)),
    ) as proc:  # fmt: skip
        os.close(slave)
        seen = read_until(master, b"New root password:")
        os.write(master, b"First-Secret-1\n")
        seen += read_until(master, b"Repeat the root password:")
        os.write(master, b"Second-Secret-2\n")
        seen += read_until(master, None)
        status = proc.wait(timeout=60)
    os.close(master)
    text = seen.decode(errors="replace")
    assert status == 2, text
    assert "Secret" not in text  # nothing typed was echoed
    errors = [line for line in text.splitlines() if line.startswith("qlimage:")]
    assert len(errors) == 1 and "do not match" in errors[0], text
    assert not (built_copy / "images.d/demo.rootpw").exists()
    assert served_listing(built_copy) == before


def read_until(fd: int, marker: bytes | None, timeout: float = 60.0) -> bytes:
    """Read the pty until `marker` appears (None: until the other side closes it)."""
    data = b""
    deadline = time.monotonic() + timeout
    while marker is None or marker not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out waiting for {marker!r}: {data!r}"
        if not select.select([fd], [], [], left)[0]:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: every writer closed the terminal
            chunk = b""
        if not chunk:
            assert marker is None, f"closed before {marker!r}: {data!r}"
            break
        data += chunk
    return data
