"""An image's own root password (`qlustar-image-reconfigure IMAGE --password`): the password is
turned into a yescrypt hash at once and only the hash is stored, in images.d/<image>.rootpw
(mode 0600), the file the pipeline reads (`qlimage.image.rootpw.image_root_hash`); removing the
file returns the image to the head's password. The plaintext never touches a file or argv."""

from __future__ import annotations

import getpass
import sys
from collections.abc import Callable
from pathlib import Path

from qlimage.atomic import write_text
from qlimage.errors import QlimageError, ToolMissing
from qlimage.image.rootpw import check_root_hash
from qlimage.run import run
from qlimage.site import Image, Site
from qlimage.trees import remove_in_root, resolve_in_root

# Debian's default password hash (libxcrypt, PAM): mkpasswd from the whois package makes it.
HASH_METHOD = "yescrypt"
MKPASSWD_PACKAGE = "whois"
MAX_PASSWORD = 1024  # bytes; longer input is a mistake (a file piped in), not a password


def ask_password(prompt: Callable[[str], str] = getpass.getpass) -> str:
    """Ask twice on the terminal, without echo; the two must match."""
    if not sys.stdin.isatty():
        raise QlimageError(
            "no terminal to ask the root password on",
            hint="pipe it in with --password-stdin",
        )
    first = prompt("New root password: ")
    check_password(first, "the password")
    if prompt("Repeat the root password: ") != first:
        raise QlimageError("the two passwords do not match: nothing changed")
    return first


def read_password_stdin(data: bytes) -> str:
    """The password from standard input: one line, its line end dropped."""
    text = data.removesuffix(b"\n").removesuffix(b"\r")
    try:
        password = text.decode()
    except UnicodeDecodeError:
        raise QlimageError("standard input: the password is not UTF-8 text") from None
    check_password(password, "standard input")
    return password


def check_password(password: str, where: str) -> None:
    if not password:
        raise QlimageError(f"{where}: empty password refused: nothing changed")
    if any(c in password for c in "\n\r\0"):
        raise QlimageError(f"{where}: expected one line holding the password, with no NUL")
    if len(password.encode()) > MAX_PASSWORD:
        raise QlimageError(f"{where}: longer than {MAX_PASSWORD} bytes; not a password")


def hash_password(password: str) -> str:
    """A fresh-salted yescrypt hash, by mkpasswd reading the password on its stdin."""
    try:
        out = run(
            ["mkpasswd", "-m", HASH_METHOD, "--stdin"],
            input=password.encode() + b"\n",
            capture=True,
        ).stdout
    except ToolMissing:
        raise ToolMissing(
            "mkpasswd: command not found", hint=f"apt-get install {MKPASSWD_PACKAGE}"
        ) from None
    # The pipeline refuses anything but a strong crypt hash: check what we are about to store.
    return check_root_hash(out.decode().strip(), "mkpasswd output")


def hash_file(site: Site, image: Image) -> Path:
    """images.d/<image>.rootpw, resolved inside images.d: the file itself may be a link (it is
    replaced or removed as a link, never written through), its directory may not lead out."""
    path = image.root_hash_file
    try:
        rel = path.relative_to(site.paths.images).as_posix()
        return resolve_in_root(site.paths.images, rel)
    except (ValueError, OSError) as e:
        raise QlimageError(f"{path}: not inside {site.paths.images}: {e}") from None


def set_image_hash(site: Site, image: Image, hash_: str) -> Path:
    path = hash_file(site, image)
    write_text(path, hash_ + "\n", mode=0o600)  # written beside and renamed in
    return path


def drop_image_hash(site: Site, image: Image) -> bool:
    """Return the image to the head's password; False if it had none of its own."""
    path = hash_file(site, image)
    if not path.is_symlink() and not path.exists():
        return False
    remove_in_root(path)
    return True


def set_password(
    site: Site, images: list[str], hash_: str | None, *, wait: bool, build: bool
) -> None:
    """Give `images` their own root password hash (None: the head's again), under the build
    lock, and rebuild them: the hash's digest is an input of each image's stage task."""
    from qlimage.image.publish import build_lock
    from qlimage.tasks.run import run_graph

    with build_lock(site.paths.bootfiles, wait=wait):
        for name in images:
            image = site.images[name]
            if hash_ is not None:
                path = set_image_hash(site, image, hash_)
                print(f"image {name}: own root password set ({path.name}, mode 0600)")
            elif drop_image_hash(site, image):
                print(f"image {name}: back to the head's root password")
            else:
                print(f"image {name}: already uses the head's root password")
        if build:
            run_graph(site, ["run"], wait=wait)
        else:
            print(f"not rebuilt (--no-build); to rebuild: qlimage -C {site.paths.root} build")
